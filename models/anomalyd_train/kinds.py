"""The nine model kinds, as PyTorch modules over normalised data.

Every model ("core") maps a normalised batch to its reconstruction of the same shape:
`[B, T, F]` (a window of T rows of F features; T = 1 for point models) or `[B, C, H, W]` for the
2-D convolutional model. `forward` is the deterministic path that is exported to ONNX;
`loss` is what training minimises (it may corrupt the input, sample, or add a penalty).
Normalisation, de-normalisation and the per-feature error are added around the core at export
(see export.py), so the cores never see raw units.

The dense kinds (pca, dense, sparse, stacked, denoising, vae) flatten the window, so they also
accept T > 1 (e.g. a denoising model over a window of a single series).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as fn

from . import KINDS, SEQUENCE_KINDS


@dataclass
class Spec:
    """Architecture and loss settings of one model. `describe()` goes into the model's metadata."""

    kind: str
    window: int
    features: int
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for 2-D conv models
    latent: int | None = None  # code size; None picks a default from the input size
    hidden: int = 32
    # sparse
    sparsity: str = "kl"  # "kl": KL divergence of mean sigmoid activation to rho; "l1": L1 of the code
    sparsity_weight: float | None = None  # default 0.1 (kl) or 1e-3 (l1)
    rho: float = 0.05
    # denoising
    noise_std: float = 0.5  # Gaussian corruption, in normalised units
    mask_prob: float = 0.1  # probability of replacing an input value by the feature mean
    # vae, and the per-row codes of conv, lstm, gru (StepCode): weight of the KL term
    beta: float = 1.0
    # lstm / gru: "position" (the default, see Recurrent); "concat" and "repeat" are the classic
    # designs, which tract's own lowering could not run (the daemon's recurrent op does)
    decoder: str = "position"
    # lstm / gru: export the recurrence unrolled over the window as plain matrix products instead
    # of ONNX's LSTM / GRU operator (see Recurrent: slower in the daemon than the operator)
    unroll: bool = False
    # pca: keep the fewest components explaining this share of the variance (unless latent is set)
    variance: float = 0.95
    # conv (1-D), lstm, gru: "step", a code for every row (`latent` units each, see StepCode), or
    # "window", one code for the whole window; None: step when there are at least 2 features
    code: str | None = None

    @property
    def flat(self) -> int:
        if self.image_shape is not None:
            c, h, w = self.image_shape
            return c * h * w
        return self.window * self.features

    def step_code(self) -> bool:
        """Whether this sequence model has a code per row (StepCode) rather than per window."""
        if self.kind not in SEQUENCE_KINDS or self.image_shape is not None:
            return False
        if self.code not in (None, "step", "window"):
            raise ValueError(f"code must be step or window, got {self.code!r}")
        if self.code == "step" and self.features < 2:
            raise ValueError("a code per row needs at least 2 features to compress; use code window")
        return self.code == "step" or (self.code is None and self.features >= 2)

    def code_size(self) -> int:
        """Units of the code: per row for a step code, else per sample."""
        if self.latent is not None:
            return self.latent
        base = max(1, min((self.features if self.step_code() else self.flat) // 2, 8))
        return 2 * base if self.kind == "sparse" else base

    def describe(self) -> dict:
        d = {"latent": self.code_size() if self.kind != "pca" else self.latent, "hidden": self.hidden}
        if self.kind == "sparse":
            d.update(sparsity=self.sparsity, sparsity_weight=self.penalty_weight(), rho=self.rho)
        if self.kind == "denoising":
            d.update(noise_std=self.noise_std, mask_prob=self.mask_prob)
        if self.kind == "vae" or self.step_code():
            d.update(beta=self.beta)
        if self.kind in SEQUENCE_KINDS and self.image_shape is None:
            d.update(code="step" if self.step_code() else "window")
        if self.kind in ("lstm", "gru") and not self.step_code():
            d.update(decoder=self.decoder, unroll=self.unroll)
        if self.kind == "pca":
            d.update(variance=self.variance)
        return d

    def penalty_weight(self) -> float:
        if self.sparsity_weight is not None:
            return self.sparsity_weight
        return 0.1 if self.sparsity == "kl" else 1e-3


class Core(nn.Module):
    """An autoencoder: `encode` maps a batch to its code, `decode` maps a code back.

    After training, `fit_code_bounds` records the range of every code unit over the training
    data and from then on `forward` clamps codes to it: the decoder only ever sees codes like
    those it was trained on. Without that, a point off the normal manifold can be explained away
    by extrapolating along a latent axis beyond anything seen in training (on the demo fleet, a
    traffic collapse to 20% looked like a host with a tiny request scale: 64% of its rows scored
    above calibration p99 without the clamp, 100% with it), while normal data is unaffected.
    """

    bounded = True  # pca, a linear baseline, opts out
    # The exported `error` is the last row's (StepCode) instead of the mean over the window.
    last_row_error = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "code_lo"):
            return z
        return torch.minimum(torch.maximum(z, self.code_lo), self.code_hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.bound(self.encode(x)))

    @torch.no_grad()
    def fit_code_bounds(self, x: torch.Tensor, batch: int = 4096) -> None:
        if not self.bounded:
            return
        self.eval()
        codes = torch.cat([self.encode(x[i : i + batch]) for i in range(0, len(x), batch)])
        self.register_buffer("code_lo", codes.min(dim=0).values.clone())
        self.register_buffer("code_hi", codes.max(dim=0).values.clone())

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return fn.mse_loss(self(x), x)

    def fit_noise(self, x: torch.Tensor) -> None:
        """After training: whatever `squared_error` needs, from the held-back windows (`Variational`)."""

    def squared_error(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The exported `error` before its mean over the window: (r - x)^2 in normalised units."""
        return (r - x) ** 2


def positions(t: int) -> torch.Tensor:
    """The recurrent kinds' position channel p_t = t / T, t = 1..T, as [1, T, 1]."""
    return (torch.arange(1, t + 1, dtype=torch.float32) / t).view(1, t, 1)


def mlp(sizes: list[int], last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Variational:
    """What the variational kinds (VAE, and the sequence models' per-row codes) share: their loss
    (`variational_loss`, over their `mu`, `logvar` heads and `beta`) and their score, each
    value's squared error over that value's noise variance, the ML sigma^2 of the "optimal sigma"
    loss, measured after training on windows it was not fitted to (`fit_noise`; `noise_var`, in
    the metadata as `noise_variance`).

    A variational model rebuilds its inputs unevenly: at beta 1 the loss pays for information in
    nats and buys precision only where it is cheap, so it rebuilds the load-driven channels
    closely and blurs the noisy ones. Its plain squared error is then ruled by the channels it
    blurs, and a broken relation between the ones it rebuilds precisely is drowned out; the
    likelihood weighs each value by how well the model knows it. On the drifting machines
    (`anomalyd-train machines`, through the daemon) the VAE's F1 rose from 0.560 to 0.857. The
    dense model rebuilds evenly, and the same weighting costs it (ROC AUC 0.929 -> 0.887): the
    plain kinds keep the plain error."""

    # The least noise variance a value is given (normalised units): a value rebuilt exactly in
    # training (a constant) must not turn every later rounding difference into an alarm.
    NOISE_FLOOR = 1e-4

    @torch.no_grad()
    def fit_noise(self, x: torch.Tensor, batch: int = 4096) -> None:
        """Each value's mean squared error over `x`, the held-back windows (fit._train).

        The variance a score is divided by is the model's error on data it has not seen, which
        is what live rows are. A model trained on a few hundred rows rebuilds some of its
        training values several times closer than any other rows (drifting machines, conv: on
        some held-out chunks, 4-10 times the training error on the load-driven channels, about
        1 on vibration), so with the training error those values weighed too much and normal
        rows scored in a heavy tail. Drifting machines, through the daemon: F1 conv 0.690 ->
        0.788, lstm 0.726 -> 0.826, vae 0.857 -> 0.865."""
        sq = sum(((self(x[i : i + batch]) - x[i : i + batch]) ** 2).sum(dim=0) for i in range(0, len(x), batch))
        self.register_buffer("noise_var", torch.clamp(sq / len(x), min=self.NOISE_FLOOR))

    def squared_error(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (r - x) ** 2 / self.noise_var

    def variational_loss(self, h: torch.Tensor, x: torch.Tensor, decode) -> torch.Tensor:
        """The "optimal sigma" loss per input value, 1/2 sum_d log(MSE_d) + beta * KL(q(z|x) || N(0, I)),
        MSE_d the batch's mean squared error of value d (its ML noise variance); the code is
        sampled from the `mu`, `logvar` heads over the encoder's state `h`, and `decode`d."""
        mu, logvar = self.mu(h), self.logvar(h).clamp(-10, 10)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        mse = ((decode(z) - x) ** 2).mean(dim=0) + 1e-6
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).flatten(1).sum(dim=1).mean()
        return (0.5 * torch.log(mse).sum() + self.beta * kl) / mse.numel()


class Flat(Core):
    """Base of the dense kinds: `encode` takes [B, T, F] (or already flat [B, T*F]) windows,
    `decode` gives [B, T, F]; `encode_flat` / `decode_flat` work on flat vectors."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.sample_shape = (spec.window, spec.features)

    def encode_flat(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_flat(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_flat(torch.flatten(x, 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_flat(z).view(-1, *self.sample_shape)


class PCA(Flat):
    """Linear baseline: projection on the top-k principal components (fitted in closed form)."""

    bounded = False

    def __init__(self, spec: Spec, k: int):
        super().__init__(spec)
        d = spec.flat
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("components", torch.zeros(d, k))

    def encode_flat(self, x):
        return (x - self.center) @ self.components

    def decode_flat(self, z):
        return z @ self.components.T + self.center


class Dense(Flat):
    """Dense autoencoder: D -> hidden -> latent -> hidden -> D, tanh activations, the code
    included (and clamped to its training range after training, see Core)."""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        d, h, k = spec.flat, spec.hidden, spec.code_size()
        self.encoder = mlp([d, h, k], last_activation=True)
        self.decoder = mlp([k, h, d])

    def encode_flat(self, x):
        return self.encoder(x)

    def decode_flat(self, z):
        return self.decoder(z)


class Denoising(Dense):
    """Dense autoencoder trained to reconstruct the clean input from a corrupted copy
    (Gaussian noise plus random masking to the feature mean, which is 0 after normalisation)."""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        self.noise_std = spec.noise_std
        self.mask_prob = spec.mask_prob

    def corrupt(self, x):
        noisy = x + self.noise_std * torch.randn_like(x)
        if self.mask_prob > 0:
            keep = (torch.rand_like(x) >= self.mask_prob).to(x.dtype)
            noisy = noisy * keep
        return noisy

    def loss(self, x):
        return fn.mse_loss(self(self.corrupt(x)), x)


class Sparse(Flat):
    """Sparse autoencoder: a wider code with a sparsity penalty instead of a narrow bottleneck.

    kl: sigmoid code units, penalty = sum over units of KL(rho || mean activation over the batch).
    l1: ReLU code units, penalty = mean over the batch of the L1 norm of the code.
    """

    def __init__(self, spec: Spec):
        super().__init__(spec)
        d, h, k = spec.flat, spec.hidden, spec.code_size()
        if spec.sparsity not in ("kl", "l1"):
            raise ValueError(f"sparsity must be kl or l1, got {spec.sparsity!r}")
        self.sparsity = spec.sparsity
        self.weight = spec.penalty_weight()
        self.rho = spec.rho
        self.encoder = nn.Sequential(
            nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k), nn.Sigmoid() if self.sparsity == "kl" else nn.ReLU()
        )
        self.decoder = mlp([k, h, d])

    def encode_flat(self, x):
        return self.encoder(x)

    def decode_flat(self, z):
        return self.decoder(z)

    def penalty(self, code):
        if self.sparsity == "l1":
            return code.abs().sum(dim=1).mean()
        rho_hat = code.mean(dim=0).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()

    def loss(self, x):
        flat = torch.flatten(x, 1)
        code = self.encode_flat(flat)
        return fn.mse_loss(self.decode_flat(code), flat) + self.weight * self.penalty(code)


class Stacked(Flat):
    """Stacked autoencoder: D -> hidden -> hidden/2 -> latent and back. Each level is first
    pretrained greedily as a shallow autoencoder of the codes below it (train.py), then the whole
    stack is fine-tuned end to end."""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        sizes = [spec.flat, spec.hidden, max(spec.hidden // 2, spec.code_size()), spec.code_size()]
        self.sizes = sizes
        levels = len(sizes) - 1
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(levels):
            inner = i < levels - 1  # the innermost code is linear
            self.encoders.append(nn.Sequential(nn.Linear(sizes[i], sizes[i + 1]), *([nn.Tanh()] if inner else [])))
            # A decoder reproduces the level below: tanh codes, except the linear data level.
            self.decoders.append(nn.Sequential(nn.Linear(sizes[i + 1], sizes[i]), *([nn.Tanh()] if i > 0 else [])))

    def encode_flat(self, x, levels: int | None = None):
        for enc in self.encoders[: levels if levels is not None else len(self.encoders)]:
            x = enc(x)
        return x

    def decode_flat(self, z):
        for dec in reversed(self.decoders):
            z = dec(z)
        return z


class VAE(Variational, Flat):
    """Variational autoencoder with a Gaussian latent.

    Training maximises the ELBO with a Gaussian likelihood whose per-dimension variance is set to
    its maximum-likelihood value, the batch's mean squared error (the "optimal sigma" VAE,
    `Variational`). This balances reconstruction against the prior without tuning a noise level, so both
    the reconstructions (for detection) and the samples decoded from the prior (for generation)
    stay sharp. The exported graph uses the mean path z = mu, and scores by the likelihood
    (`Variational`). `anomalyd-train generate` decodes z ~ N(0, I) to sample synthetic normal
    data."""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        d, h, k = spec.flat, spec.hidden, spec.code_size()
        self.beta = spec.beta
        self.body = mlp([d, h], last_activation=True)
        self.mu = nn.Linear(h, k)
        self.logvar = nn.Linear(h, k)
        self.decoder = mlp([k, h, d])

    def encode_flat(self, x):
        return self.mu(self.body(x))

    def decode_flat(self, z):
        return self.decoder(z)

    def loss(self, x):
        flat = torch.flatten(x, 1)
        return self.variational_loss(self.body(flat), flat, self.decode_flat)


class Conv1D(Core):
    """1-D convolutional autoencoder over a window [B, T, F]: convolutions along time (features
    are channels), a strided layer halving T, a dense bottleneck, and the mirror image back."""

    def __init__(self, spec: Spec):
        super().__init__()
        f, t, c, k = spec.features, spec.window, max(8, spec.hidden // 2), spec.code_size()
        half = (t + 1) // 2
        self.t, self.c, self.half = t, c, half
        self.enc = nn.Sequential(
            nn.Conv1d(f, c, 5, padding=2), nn.ReLU(), nn.Conv1d(c, c, 5, stride=2, padding=2), nn.ReLU()
        )
        self.to_code = nn.Linear(c * half, k)
        self.from_code = nn.Sequential(nn.Linear(k, c * half), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose1d(c, c, 4, stride=2, padding=1), nn.ReLU())
        self.out = nn.Conv1d(c, f, 5, padding=2)

    def encode(self, x):
        h = self.enc(x.transpose(1, 2))  # [B, c, half]
        return self.to_code(torch.flatten(h, 1))

    def decode(self, z):
        h = self.from_code(z).view(-1, self.c, self.half)
        h = self.up(h)[:, :, : self.t]  # 2*half >= T
        return self.out(h).transpose(1, 2)


class StepCode(Variational, Core):
    """Base of the sequence models with a code per row (the default with 2 or more features).

    Causal: row t's code z_t (k < F units) is computed from rows up to t, and row t is rebuilt
    from z_1..z_t. The codes before t know nothing of row t, so its own information passes only
    through z_t's k units: a bottleneck per row, like the dense model's, with the rows before
    it as context. A window-wide code (Conv1D, Recurrent) must squeeze T rows into one code of
    at most 8 units; on 400 rows of 8 load-driven channels (`anomalyd-train machines`) that left
    conv and lstm reconstructing no better than 0.08 and 0.24 (normalised MSE), where a step
    code gets 0.009 and 0.035 (dense: 0.004), and ROC AUC 0.83 -> 0.91 and 0.73 -> 0.92.

    The score is the last row's error (`last_row_error`): the row being judged, with the most
    context; the window's earlier rows were judged when they arrived. Averaging over the window
    would smear a fault over the T rows after it and dilute its first ones (conv: ROC AUC 0.88
    averaged, 0.91 on the last row, the same models). One feature cannot be
    compressed per row, so a single series keeps the window code.

    The codes are variational, as the VAE's: each row's code is a Gaussian (`mu`, `logvar` from
    the encoder's state at that row), trained with the VAE's loss (`--beta`), and scored
    by the likelihood (`Variational`). The KL term makes every unit of a row's code cost what it
    carries, so the code does not spend itself on a row's deviation from what the earlier rows
    predict; with the plain deterministic code it carried a leak or a stuck sensor into the
    reconstruction (conv missed 85 % and 82 % of their rows on the drifting machines)."""

    last_row_error = True

    def __init__(self, spec: Spec):
        super().__init__()
        self.t, self.k = spec.window, spec.code_size()
        self.beta = spec.beta
        self.mu = nn.Linear(spec.hidden, self.k)
        self.logvar = nn.Linear(spec.hidden, self.k)

    def hidden_steps(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> the encoder's state at every row, [B, T, hidden] (causal)."""
        raise NotImplementedError

    def encode_steps(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, F] -> codes [B, T, k] (the mean path)."""
        return self.mu(self.hidden_steps(x))

    def decode_steps(self, z: torch.Tensor) -> torch.Tensor:
        """codes [B, T, k] -> [B, T, F]."""
        raise NotImplementedError

    def encode(self, x):
        return torch.flatten(self.encode_steps(x), 1)  # bounded per unit and row

    def decode(self, z):
        return self.decode_steps(z.view(-1, self.t, self.k))

    def loss(self, x):
        return self.variational_loss(self.hidden_steps(x), x, self.decode_steps)


class Conv1DStep(StepCode):
    """Causal 1-D convolutions along time (kernel 3, padded on the left only), a per-row code
    of `latent` units, and the mirror image back."""

    KERNEL = 3

    def __init__(self, spec: Spec):
        super().__init__(spec)
        f, h = spec.features, spec.hidden
        self.enc = nn.Sequential(nn.Conv1d(f, h, self.KERNEL), nn.Tanh())
        self.dec = nn.Sequential(nn.Conv1d(self.k, h, self.KERNEL), nn.Tanh(), nn.Conv1d(h, f, 1))

    def _causal(self, layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        return layers(fn.pad(x.transpose(1, 2), (self.KERNEL - 1, 0))).transpose(1, 2)

    def hidden_steps(self, x):
        return self._causal(self.enc, x)

    def decode_steps(self, z):
        return self._causal(self.dec, z)


class RecurrentStep(StepCode):
    """An LSTM or GRU reads the rows, its state at each row gives that row's code, a second
    one reads the codes and a linear layer rebuilds each row. Both read the row's position
    p_t = t / T too, as Recurrent's do: tract's GRU kernel fails on a single input feature."""

    def __init__(self, spec: Spec):
        super().__init__(spec)
        if spec.decoder != "position" or spec.unroll:
            raise ValueError("the decoder designs and unroll are for a window code (code window)")
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[spec.kind]
        f, h = spec.features, spec.hidden
        self.encoder = cell(f + 1, h, batch_first=True)
        self.decoder = cell(self.k + 1, h, batch_first=True)
        self.out = nn.Linear(h, f)
        self.register_buffer("steps", positions(self.t))

    def _with_position(self, x):
        return torch.cat([x, self.steps.expand(x.shape[0], -1, -1)], dim=2)

    def hidden_steps(self, x):
        seq, _ = self.encoder(self._with_position(x))
        return seq

    def decode_steps(self, z):
        seq, _ = self.decoder(self._with_position(z))
        return self.out(seq)


class Conv2D(Core):
    """2-D convolutional autoencoder over image-shaped records [B, C, H, W]: two stride-2
    convolutions, a dense bottleneck, two stride-2 transposed convolutions, cropped to H x W."""

    def __init__(self, spec: Spec):
        super().__init__()
        ch, h, w = spec.image_shape
        c, k = max(8, spec.hidden // 2), spec.code_size()
        h4, w4 = (h + 3) // 4, (w + 3) // 4
        self.h, self.w, self.c2, self.h4, self.w4 = h, w, 2 * c, h4, w4
        self.enc = nn.Sequential(
            nn.Conv2d(ch, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.to_code = nn.Linear(2 * c * h4 * w4, k)
        self.from_code = nn.Sequential(nn.Linear(k, 2 * c * h4 * w4), nn.ReLU())
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c, ch, 4, stride=2, padding=1),
        )

    def encode(self, x):
        return self.to_code(torch.flatten(self.enc(x), 1))

    def decode(self, z):
        h = self.from_code(z).view(-1, self.c2, self.h4, self.w4)
        return self.dec(h)[:, :, : self.h, : self.w]


class Recurrent(Core):
    """Sequence-to-sequence recurrent autoencoder (LSTM or GRU) over a window [B, T, F].

    Every recurrent step also reads its position p_t = t / T (t = 1..T):
    - encoder: reads [x_t, p_t]; its last output goes through a linear layer to the code z;
    - decoder: reads [z * p_t, p_t] at every step; a linear layer maps its outputs to F features.
    Scaling the code by p_t (> 0, so z is recoverable at every step) means the decoder's input
    is not a copy of the code broadcast over time.

    That choice was forced by tract 0.23's own lowering of the recurrent operators, measured:
    - `decoder="repeat"`, the classic RepeatVector (z alone repeated over time): an LSTM fails
      to load ("EinSum: Trying to substitute a T,batch,4H by 1,batch,4H"); NOTES.md saw it run
      2.7e-2 off in another set-up;
    - `decoder="concat"`, [z, p_t] (z repeated, plus the position channel): the same load failure
      for LSTM, although NOTES.md measured it exact in another set-up;
    - a GRU reading a single feature (F = 1) fails at run time ("GruSeq: xw not contiguous"),
      which the encoder's position channel avoids.
    The default "position" design is exact (~1e-7) for LSTM and GRU, F = 1..6, T = 4..32. The
    daemon now runs plain LSTM and GRU nodes with its own whole-sequence op
    (src/model/recurrent.rs), on which the other two designs are exact as well (the parity tests
    hold all three); "position" stays the default.

    With `unroll`, the exported recurrence is written out over the window: the input projection
    of every step is one matrix product, then each step is a [B, H] x [H, G*H] product and
    element-wise gates. The window is fixed at export, so this is the same function as the
    LSTM / GRU operator. The daemon runs that operator as one whole-sequence op (its own
    `LstmSeq` for LSTM, tract's `GruSeq` for GRU), which is 3x faster than this unrolled graph
    at batch 256 and 4x at batch 1 (~900 nodes of per-node overhead), so the unrolled export is
    kept only as a parity variant (NOTES.md). Training always uses PyTorch's fused cells.
    """

    def __init__(self, spec: Spec):
        super().__init__()
        cell = {"lstm": nn.LSTM, "gru": nn.GRU}[spec.kind]
        f, t, h, k = spec.features, spec.window, spec.hidden, spec.code_size()
        if spec.decoder not in ("position", "concat", "repeat"):
            raise ValueError(f"decoder must be position, concat or repeat, got {spec.decoder!r}")
        self.design = spec.decoder
        self.t = t
        self.kind = spec.kind
        if spec.unroll and self.design != "position":
            raise ValueError("unroll needs decoder='position'")
        self.unroll = spec.unroll
        self.encoder = cell(f + (1 if self.design == "position" else 0), h, batch_first=True)
        self.to_code = nn.Linear(h, k)
        self.decoder = cell(k + (0 if self.design == "repeat" else 1), h, batch_first=True)
        self.out = nn.Linear(h, f)
        self.register_buffer("steps", positions(t))

    def encode(self, x):
        if self._unrolled():
            # [x_t, p_t] W^T + b = x_t W_x^T + (p_t w_p + b): every step's input projection in one
            # product, time-major so that each step's slice is contiguous
            w_ih, w_hh, bias = self._cell(self.encoder)
            steps = self.steps.view(self.t, 1, 1)
            gates = x.transpose(0, 1) @ w_ih[:, :-1].t() + (steps * w_ih[:, -1] + bias)  # [T, B, G]
            return self.to_code(self._unroll(self.encoder, gates.unbind(0), w_hh)[-1])
        if self.design == "position":
            x = torch.cat([x, self.steps.expand(x.shape[0], -1, -1)], dim=2)
        seq, _ = self.encoder(x)
        return self.to_code(seq[:, -1, :])  # [B, k]

    def decode(self, z):
        if self._unrolled():
            # [z p_t, p_t] W^T + b = p_t (z W_z^T) + (p_t w_p + b): one product for all steps
            w_ih, w_hh, bias = self._cell(self.decoder)
            zw = z @ w_ih[:, :-1].t()  # [B, G]
            steps = self.steps.view(self.t, 1)
            const = steps * w_ih[:, -1] + bias  # [T, G]
            gates = [zw * steps[t] + const[t] for t in range(self.t)]
            return self.out(torch.stack(self._unroll(self.decoder, gates, w_hh), dim=1))
        pos = self.steps.expand(z.shape[0], -1, -1)  # [B, T, 1]
        rep = z.unsqueeze(1).expand(-1, self.t, -1)  # [B, T, k]
        if self.design == "position":
            dec_in = torch.cat([rep * self.steps, pos], dim=2)
        elif self.design == "concat":
            dec_in = torch.cat([rep, pos], dim=2)
        else:
            dec_in = rep
        dec, _ = self.decoder(dec_in)
        return self.out(dec)

    def _unrolled(self) -> bool:
        """While tracing for export, the recurrence is written out (see the class doc)."""
        return self.unroll and not self.training and torch.jit.is_tracing()

    def _cell(self, rnn):
        """`rnn`'s weights for the written-out cell: the input weights [G, I], the recurrent
        weights transposed [H, G], and every bias that can be folded into the input projection.
        An LSTM's gates are reordered i, f, o, g (PyTorch's order is i, f, g, o), so the three
        sigmoid gates are one slice."""
        h = rnn.hidden_size
        w_ih, w_hh, b_ih, b_hh = rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0
        if self.kind == "lstm":
            order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
            return w_ih[order], w_hh[order].t(), (b_ih + b_hh)[order]
        # GRU: the candidate's recurrent bias sits inside r * (W_hn h + b_hn), so it stays there
        return w_ih, w_hh.t(), b_ih + torch.cat([b_hh[: 2 * h], torch.zeros(h)])

    def _unroll(self, rnn, gates, w_hh) -> list:
        """The outputs [B, H] of `rnn` at each step, from a zero state, given each step's input
        projection [B, G] (biases folded, as `_cell` gives them)."""
        n = rnn.hidden_size
        b_hn = rnn.bias_hh_l0[2 * n :]  # GRU: the candidate's recurrent bias
        h, c, outs = None, None, []
        for a in gates:
            rec = None if h is None else h @ w_hh
            if self.kind == "lstm":
                a = a if rec is None else a + rec
                sig, g = torch.sigmoid(a[:, : 3 * n]), torch.tanh(a[:, 3 * n :])
                i, f, o = sig[:, :n], sig[:, n : 2 * n], sig[:, 2 * n :]
                c = i * g if c is None else f * c + i * g
                h = o * torch.tanh(c)
            else:
                rz = torch.sigmoid(a[:, : 2 * n] if rec is None else a[:, : 2 * n] + rec[:, : 2 * n])
                r, z = rz[:, :n], rz[:, n:]
                cand = torch.tanh(a[:, 2 * n :] + r * (b_hn if rec is None else rec[:, 2 * n :] + b_hn))
                h = cand - z * cand if h is None else cand + z * (h - cand)
            outs.append(h)
        return outs


def build(spec: Spec, pca_components: int | None = None) -> Core:
    if spec.kind not in KINDS:
        raise ValueError(f"unknown kind {spec.kind!r}; kinds: {', '.join(KINDS)}")
    if spec.kind == "pca":
        return PCA(spec, pca_components or 1)
    if spec.kind == "conv":
        return Conv2D(spec) if spec.image_shape is not None else Conv1DStep(spec) if spec.step_code() else Conv1D(spec)
    if spec.image_shape is not None:
        raise ValueError(f"--shape (image-shaped input) is for kind conv only, not {spec.kind}")
    return {
        "dense": Dense,
        "denoising": Denoising,
        "sparse": Sparse,
        "stacked": Stacked,
        "vae": VAE,
        "lstm": RecurrentStep if spec.step_code() else Recurrent,
        "gru": RecurrentStep if spec.step_code() else Recurrent,
    }[spec.kind](spec)
