"""Training loops. Inputs are normalised windows (`[n, T, F]` or `[n, C, H, W]`) as float32.

- `fit_minibatch`: Adam on the kind's loss, validation reconstruction MSE after every epoch, the
  weights of the best validation epoch are kept.
- `stacked`: greedy layer-wise pretraining of each level, then `fit_minibatch` to fine-tune.
- `pca`: closed form (SVD); the "curve" is the validation MSE against the number of components.

Every function returns a history: a list of dicts {"phase", "epoch", "train", "val"}.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as fn
from tqdm import tqdm

from .kinds import PCA, Core, Spec, Stacked


# Without --epochs, training runs until the validation loss stops improving, for at most as
# many epochs as make this many optimizer steps (at least MIN_EPOCHS): on a few hundred rows, 30
# epochs are 150 steps and leave a model still far from fitted (its loss curve still falling).
AUTO_STEPS = 5000
MIN_EPOCHS = 30
MAX_EPOCHS = 2000


def auto_epochs(train_windows: int, batch_size: int) -> tuple[int, int]:
    """(most epochs, patience) for early stopping on this much training data: stop once the
    validation loss has not improved by 0.1 % for `patience` epochs."""
    steps_per_epoch = -(-train_windows // batch_size)
    most = min(MAX_EPOCHS, max(MIN_EPOCHS, -(-AUTO_STEPS // steps_per_epoch)))
    return most, max(10, most // 10)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    pretrain_epochs: int | None = None  # stacked: per level; default max(1, epochs // 3)
    threads: int = 1
    quiet: bool = False
    # stop once the validation loss has not improved by 0.1 % for this many epochs (None: never)
    patience: int | None = None


def seed_everything(seed: int, threads: int) -> None:
    """Same seed, same thread count, same machine type -> bit-identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@torch.no_grad()
def reconstruction_mse(core: Core, x: torch.Tensor, batch: int = 4096) -> float:
    core.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        total += fn.mse_loss(core(xb), xb, reduction="sum").item()
    return total / x.numel()


def _batches(n: int, size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    for i in range(0, n, size):
        yield order[i : i + size]


def fit_minibatch(
    core: Core, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig, phase: str = "train"
) -> list[dict]:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(core.parameters(), lr=cfg.lr)
    history = []
    best, best_state, best_epoch = float("inf"), None, 0
    bar = tqdm(range(cfg.epochs), desc=phase, unit="epoch", disable=cfg.quiet, leave=True)
    for epoch in bar:
        if cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            break
        core.train()
        total, count = 0.0, 0
        for idx in _batches(len(train), cfg.batch_size, gen):
            xb = train[idx]
            loss = core.loss(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        val_mse = reconstruction_mse(core, val)
        history.append({"phase": phase, "epoch": epoch + 1, "train": total / count, "val": val_mse})
        if val_mse < best:
            if val_mse < best * (1 - 1e-3):
                best_epoch = epoch
            best, best_state = val_mse, copy.deepcopy(core.state_dict())
        bar.set_postfix(loss=f"{total / count:.4g}", val=f"{val_mse:.4g}")
    if best_state is not None:
        core.load_state_dict(best_state)
    core.eval()
    return history


def fit_stacked(core: Stacked, train: torch.Tensor, val: torch.Tensor, cfg: TrainConfig) -> list[dict]:
    """Greedy layer-wise pretraining: level i is trained as a shallow autoencoder (encoder i,
    decoder i) of the codes that the already-trained levels below produce; then fine-tuning."""
    history: list[dict] = []
    pre_epochs = cfg.pretrain_epochs if cfg.pretrain_epochs is not None else max(1, cfg.epochs // 3)
    flat_train, flat_val = torch.flatten(train, 1), torch.flatten(val, 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    for level, (enc, dec) in enumerate(zip(core.encoders, core.decoders)):
        with torch.no_grad():
            below_train = core.encode_flat(flat_train, levels=level)
            below_val = core.encode_flat(flat_val, levels=level)
        params = list(enc.parameters()) + list(dec.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)
        phase = f"pretrain level {level + 1}"
        bar = tqdm(range(pre_epochs), desc=phase, unit="epoch", disable=cfg.quiet, leave=True)
        for epoch in bar:
            total, count = 0.0, 0
            for idx in _batches(len(below_train), cfg.batch_size, gen):
                xb = below_train[idx]
                loss = fn.mse_loss(dec(enc(xb)), xb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            with torch.no_grad():
                val_loss = fn.mse_loss(dec(enc(below_val)), below_val).item()
            history.append({"phase": phase, "epoch": epoch + 1, "train": total / count, "val": val_loss})
            bar.set_postfix(loss=f"{total / count:.4g}", val=f"{val_loss:.4g}")
    history += fit_minibatch(core, train, val, cfg, phase="fine-tune")
    return history


def fit_pca(spec: Spec, train: torch.Tensor, val: torch.Tensor) -> tuple[PCA, list[dict]]:
    """Principal components of the (normalised, flattened) training windows by SVD. Keeps
    `spec.latent` components, or the fewest that explain `spec.variance` of the variance
    (at most D - 1, so that the model cannot reproduce everything)."""
    x = torch.flatten(train, 1).double()
    d = x.shape[1]
    center = x.mean(dim=0)
    _, s, vt = torch.linalg.svd(x - center, full_matrices=False)
    explained = (s**2).cumsum(0) / (s**2).sum()
    # Fewer training windows than dimensions (a short series, a wide window) leave only
    # len(s) = min(n, D) components to choose from.
    r = len(s)
    if spec.latent is not None:
        k = spec.latent
        if not 1 <= k <= r:
            raise ValueError(f"pca --latent must be between 1 and {r} (the components of {x.shape[0]} "
                             f"training windows of {d} values), got {k}")
    else:
        k = int(torch.searchsorted(explained, torch.tensor(spec.variance, dtype=explained.dtype)).item()) + 1
        k = max(1, min(k, r, d - 1 if d > 1 else 1))
    spec.latent = k
    flat_val = torch.flatten(val, 1).double()
    history = []
    for j in range(1, r + 1):
        w = vt[:j].T
        rec_t = (x - center) @ w @ w.T + center
        rec_v = (flat_val - center) @ w @ w.T + center
        history.append({
            "phase": "components",
            "epoch": j,
            "train": fn.mse_loss(rec_t, x).item(),
            "val": fn.mse_loss(rec_v, flat_val).item(),
            "explained": explained[j - 1].item(),
        })
    history[k - 1]["kept"] = True
    core = PCA(spec, k)
    core.center.copy_(center.float())
    core.components.copy_(vt[:k].T.float())
    core.eval()
    return core, history
