"""`fit`: data file -> trained model -> one self-describing ONNX file (+ loss-curve PNG)."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from . import KINDS, SEQUENCE_KINDS, __version__, calibrate, data, export, plots
from . import baseline as baselines
from .kinds import Core, Spec, build
from .train import TrainConfig, auto_epochs, fit_minibatch, fit_pca, fit_stacked, seed_everything

DEFAULT_SEQUENCE_WINDOW = 16


@dataclass
class FitOptions:
    kind: str
    data: str
    features: list[str]
    out: str
    key: str | None = None
    window: int | None = None  # default: 1, or 16 for conv (1-D), lstm and gru
    shape: tuple[int, int, int] | None = None  # conv 2-D: (C, H, W)
    epochs: int | None = None  # None: until the validation loss stops improving (train.auto_epochs)
    batch_size: int = 64
    lr: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0
    threads: int = 1
    version: str = "1.0.0"
    name: str | None = None
    quiet: bool = False
    plot: bool = True
    # architecture / kind-specific, see kinds.Spec
    latent: int | None = None
    hidden: int = 32
    sparsity: str = "kl"
    sparsity_weight: float | None = None
    rho: float = 0.05
    noise_std: float = 0.5
    mask_prob: float = 0.1
    beta: float = 1.0
    pretrain_epochs: int | None = None
    variance: float = 0.95
    decoder: str = "position"
    unroll: bool = False
    code: str | None = None  # conv (1-D), lstm, gru: "step" or "window"; None: step with >= 2 features
    # features made relative to a slow per-key level (see baseline.py); none by default
    baseline: list[str] = field(default_factory=list)
    baseline_half_life: float = baselines.DEFAULT_HALF_LIFE
    # with fewer than calibrate.SMALL_CALIBRATION validation windows, calibrate on the held-out
    # scores of this many fold models too (1: the validation windows alone)
    calibration_folds: int = 5


@dataclass
class FitResult:
    path: str
    png: str | None
    core: Core
    model: export.Exported  # the PyTorch module that was exported (normalisation included)
    proto: onnx.ModelProto  # its metadata_props are `meta`, set by `write`
    history: list[dict]
    calibration: dict
    train: np.ndarray  # raw training windows
    val: np.ndarray  # raw validation windows
    seconds: float
    meta: dict = field(default_factory=dict)


def best_val_mse(history: list[dict], spec: Spec) -> float:
    """Validation reconstruction MSE of the exported model (PCA: at the kept component count)."""
    if spec.kind == "pca":
        return history[spec.latent - 1]["val"]
    return min(h["val"] for h in history if h["phase"] in ("train", "fine-tune"))


def noise_variance(core: Core) -> dict:
    """A variational model's per-value noise variance, which its `error` is divided by, for the
    metadata (kinds.Variational)."""
    if not hasattr(core, "noise_var"):
        return {}
    return {"noise_variance": [[float(f"{v:.6g}") for v in row] for row in core.noise_var.tolist()]}


def validate(opts: FitOptions) -> None:
    """Rejects option values that would otherwise fail deep inside torch."""
    checks = [
        (opts.latent is None or opts.latent >= 1, f"--latent must be at least 1, got {opts.latent}"),
        (opts.hidden >= 1, f"--hidden must be at least 1, got {opts.hidden}"),
        (opts.batch_size >= 1, f"--batch-size must be at least 1, got {opts.batch_size}"),
        (opts.lr > 0, f"--lr must be positive, got {opts.lr}"),
        (opts.threads >= 1, f"--threads must be at least 1, got {opts.threads}"),
        (opts.calibration_folds >= 1, f"--calibration-folds must be at least 1, got {opts.calibration_folds}"),
        (opts.noise_std >= 0, f"--noise-std must not be negative, got {opts.noise_std}"),
        (0 <= opts.mask_prob < 1, f"--mask-prob must be in [0, 1), got {opts.mask_prob}"),
        (0 < opts.rho < 1, f"--rho must be in (0, 1), got {opts.rho}"),
        (0 < opts.variance <= 1, f"--variance must be in (0, 1], got {opts.variance}"),
        (opts.beta >= 0, f"--beta must not be negative, got {opts.beta}"),
        (opts.pretrain_epochs is None or opts.pretrain_epochs >= 1,
         f"--pretrain-epochs must be at least 1, got {opts.pretrain_epochs}"),
        (opts.code in (None, "step", "window"), f"--code must be step or window, got {opts.code}"),
        (opts.code != "step" or len(opts.features) >= 2,
         "--code step needs at least 2 features (one value per row cannot be compressed); use --code window"),
    ]
    for ok, message in checks:
        if not ok:
            raise data.DataError(message)


def resolve_window(opts: FitOptions) -> int:
    if opts.shape is not None:
        if opts.kind != "conv":
            raise data.DataError(f"--shape is for kind conv (2-D) only, not {opts.kind}")
        if opts.window not in (None, 1):
            raise data.DataError("--window does not apply to image-shaped (--shape) models")
        return 1
    if opts.window is None:
        return DEFAULT_SEQUENCE_WINDOW if opts.kind in SEQUENCE_KINDS else 1
    if opts.window < 1:
        raise data.DataError(f"--window must be at least 1, got {opts.window}")
    if opts.kind in ("lstm", "gru", "conv") and opts.window < 2:
        raise data.DataError(f"kind {opts.kind} needs a window of at least 2 rows, got {opts.window}")
    return opts.window


# Fewest held-back windows a variational model's noise variance is measured on; with fewer, the
# training windows are added (a variance from a handful of windows would be mostly chance).
MIN_NOISE_WINDOWS = 20


def _train(spec: Spec, train_n: torch.Tensor, val_n: torch.Tensor, cfg: TrainConfig) -> tuple[Core, list[dict]]:
    """One model of `spec` trained on normalised windows, in eval mode, its code bounded to
    what the training windows produce, and (variational kinds) its noise variance measured on
    the held-back windows (kinds.Variational.fit_noise says why)."""
    if spec.kind == "pca":
        core, history = fit_pca(spec, train_n, val_n)
    else:
        core = build(spec)
        if spec.kind == "stacked":
            history = fit_stacked(core, train_n, val_n, cfg)
        else:
            history = fit_minibatch(core, train_n, val_n, cfg)
    core.fit_code_bounds(train_n)
    core.eval()
    core.fit_noise(val_n if len(val_n) >= MIN_NOISE_WINDOWS else torch.cat([train_n, val_n]))
    return core, history


def _cross_errors(spec: Spec, parts: list[np.ndarray], window: int, norm, cfg: TrainConfig, k: int) -> np.ndarray:
    """The `error` output, on each fold's held-out windows, of a model trained like the shipped
    one (same kind, size, epochs rule and normalisation) on the other folds: [n, F]."""
    mean, std, image = norm
    bshape = (1, -1, 1, 1) if image else (1, 1, -1)

    def normalised(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - mean.reshape(bshape)) / std.reshape(bshape)).float()

    errors = []
    for i, (train, held) in enumerate(data.folds(parts, window, k, cfg.seed)):
        seed_everything(cfg.seed + 1 + i, cfg.threads)
        fold_cfg = dataclasses.replace(cfg, seed=cfg.seed + 1 + i, quiet=True)
        core, _ = _train(copy.deepcopy(spec), normalised(train), normalised(held), fold_cfg)
        with torch.no_grad():
            _, err = export.Exported(core, mean, std, image=image)(torch.from_numpy(held))
        errors.append(err.numpy())
    return np.concatenate(errors) if errors else np.zeros((0, spec.features), np.float32)


def check(opts: FitOptions) -> int:
    """Rejects bad options before any data is read; returns the window."""
    if opts.kind not in KINDS:
        raise data.DataError(f"unknown kind {opts.kind!r}; kinds: {', '.join(KINDS)}")
    if opts.epochs is not None and opts.epochs < 1 and opts.kind != "pca":
        raise data.DataError(f"--epochs must be at least 1, got {opts.epochs}")
    if not opts.out.endswith(".onnx"):
        raise data.DataError(f"--out must name a .onnx file, got {opts.out}")
    validate(opts)
    window = resolve_window(opts)
    if opts.kind == "pca" and opts.shape is None and window * len(opts.features) < 2:
        # PCA keeps at most D-1 of D components; with D = 1 it would keep the one there is and
        # reconstruct every point exactly: every score 0, nothing ever flagged.
        raise data.DataError(
            "kind pca needs at least 2 input values per sample (window x features), here 1: it keeps "
            "at most D-1 of D components, so on one value every score would be 0. Give a --window "
            "of 2 or more (a PCA of the series' recent shape), more --features, or another --kind "
            "(dense works on a single value)"
        )
    return window


def fit(opts: FitOptions) -> FitResult:
    """Trains on `opts.data` and writes the model to `opts.out` (and its loss curve beside it)."""
    check(opts)
    table = data.load(opts.data, opts.features, key=opts.key, shape=opts.shape)
    parts = [table.values] if opts.shape is not None else data.series(table)
    source = {"sha256": table.sha256, "rows": table.rows, "file": os.path.basename(opts.data)}
    res = fit_series(opts, parts, source)
    write(res, opts)
    return res


def write(res: FitResult, opts: FitOptions) -> None:
    """Saves the model with `res.meta` as its metadata (atomically) and, unless `opts.plot` is
    off, its loss curve."""
    export.set_metadata(res.proto, res.meta)
    export.save(res.proto, opts.out)
    if opts.plot:
        res.png = plots.loss_png_path(opts.out)
        window = res.meta["anomalyd.window"]
        title = f"{res.meta['anomalyd.name']}: {opts.kind}, window {window}, {len(res.train)} training windows"
        plots.loss_curve(res.history, title, res.png)


def fit_series(opts: FitOptions, parts: list[np.ndarray], source: dict) -> FitResult:
    """Trains on series already loaded (one array per entity, rows in time order) and returns the
    exported model in memory; `source` describes the data for the metadata (`training_data`)."""
    window = check(opts)
    seed_everything(opts.seed, opts.threads)
    started = time.perf_counter()
    baseline = None
    if opts.baseline:
        if opts.shape is not None:
            raise data.DataError("--baseline applies to tabular features, not to image-shaped (--shape) records")
        baseline = baselines.fit(parts, opts.features, opts.baseline, opts.baseline_half_life)
        parts = [baseline.apply(p, opts.features) for p in parts]
    train, val = data.split_windows(parts, window, opts.val_fraction, opts.seed)
    mean, std = data.normalisation(train)
    image = opts.shape is not None
    bshape = (1, -1, 1, 1) if image else (1, 1, -1)
    train_n = torch.from_numpy((train - mean.reshape(bshape)) / std.reshape(bshape)).float()
    val_n = torch.from_numpy((val - mean.reshape(bshape)) / std.reshape(bshape)).float()

    spec = Spec(
        kind=opts.kind, window=window, features=len(opts.features), image_shape=opts.shape,
        latent=opts.latent, hidden=opts.hidden, sparsity=opts.sparsity,
        sparsity_weight=opts.sparsity_weight, rho=opts.rho, noise_std=opts.noise_std,
        mask_prob=opts.mask_prob, beta=opts.beta, decoder=opts.decoder, unroll=opts.unroll, variance=opts.variance,
        code=opts.code,
    )
    epochs, patience = (opts.epochs, None) if opts.epochs is not None else auto_epochs(len(train), opts.batch_size)
    cfg = TrainConfig(
        epochs=epochs, batch_size=opts.batch_size, lr=opts.lr, seed=opts.seed,
        pretrain_epochs=opts.pretrain_epochs, threads=opts.threads, quiet=opts.quiet, patience=patience,
    )
    core, history = _train(spec, train_n, val_n, cfg)

    model = export.Exported(core, mean, std, image=image)
    proto = export.to_onnx(model, torch.from_numpy(val[:2]))
    _, err = export.run(export.session(proto), val)
    folds = 0
    if len(val) < calibrate.SMALL_CALIBRATION and opts.calibration_folds > 1:
        # Too few held-back windows to place a high quantile: add the held-out scores of
        # models trained alike on the other folds, so every row counts once more.
        cross = _cross_errors(spec, parts, window, (mean, std, image), cfg, opts.calibration_folds)
        folds = opts.calibration_folds
        err = np.concatenate([err, cross])
    calibration = calibrate.summarise(err)

    name = opts.name or os.path.splitext(os.path.basename(opts.out))[0]
    meta: dict[str, object] = {
        "anomalyd.kind": opts.kind,
        "anomalyd.features": list(opts.features),
        "anomalyd.window": str(window),
        "anomalyd.calibration": calibration,
        "anomalyd.version": opts.version,
        "anomalyd.trained_at": export.trained_at(),
        "anomalyd.training_data": source,
        "anomalyd.name": name,
        "anomalyd.normalisation": {
            "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        },
        "anomalyd.training": {
            "toolkit": f"anomalyd-train {__version__}",
            "torch": torch.__version__,
            "seed": opts.seed,
            "epochs": sum(h["phase"] in ("train", "fine-tune") for h in history) if opts.kind != "pca" else 0,
            "early_stopping": patience is not None and opts.kind != "pca",
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "val_fraction": opts.val_fraction,
            "key": opts.key,
            "train_windows": int(len(train)),
            "val_windows": int(len(val)),
            "val_mse": float(f"{best_val_mse(history, spec):.6g}"),
            "calibration_folds": folds,
            "architecture": {**spec.describe(), "code_clamped_to_training_range": core.bounded,
                             **noise_variance(core)},
        },
    }
    if image:
        meta["anomalyd.shape"] = list(opts.shape)
    if baseline is not None:
        meta["anomalyd.baseline"] = baseline.metadata()
    if opts.kind == "vae":
        meta["anomalyd.vae"] = {"latent": spec.code_size(), "latent_tensor": export.find_tensor(proto, "/core/mu/")}
    proto.producer_name = "anomalyd-train"
    proto.producer_version = __version__
    proto.doc_string = (
        f"anomalyd {opts.kind} autoencoder over {window} row(s) of {', '.join(opts.features)}; "
        "see docs/MODEL-CONTRACT.md"
    )
    seconds = time.perf_counter() - started
    return FitResult(
        path=opts.out, png=None, core=core, model=model, proto=proto, history=history,
        calibration=calibration, train=train, val=val, seconds=seconds, meta=meta,
    )
