"""The loss-curve PNG written beside every model (NAME.onnx -> NAME.loss.png)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402


def loss_png_path(model_path: str) -> str:
    root, _ = os.path.splitext(model_path)
    return root + ".loss.png"


def loss_curve(history: list[dict], title: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history and history[0]["phase"] == "components":  # PCA: error against components kept
        xs = [h["epoch"] for h in history]
        ax.plot(xs, [h["train"] for h in history], "o-", label="training MSE")
        ax.plot(xs, [h["val"] for h in history], "s-", label="validation MSE")
        ax.set_xlabel("principal components")
        ax.set_xticks(xs)
        kept = [h["epoch"] for h in history if h.get("kept")]
        if kept:
            ax.axvline(kept[0], color="grey", lw=0.8, ls=":", label=f"kept: {kept[0]}")
    else:
        # A loss that can be negative (the VAE's log-likelihood terms) goes on its own linear axis.
        signed = any(h["train"] <= 0 for h in history)
        tax = ax.twinx() if signed else ax
        x0 = 0
        phases = []
        for h in history:
            if not phases or phases[-1][0] != h["phase"]:
                phases.append((h["phase"], []))
            phases[-1][1].append(h)
        for i, (phase, rows) in enumerate(phases):
            xs = [x0 + r["epoch"] for r in rows]
            suffix = f" ({phase})" if len(phases) > 1 else ""
            tax.plot(xs, [r["train"] for r in rows], "-", color=f"C{2 * i}",
                     label="training loss" + suffix + (" (right axis)" if signed else ""))
            ax.plot(xs, [r["val"] for r in rows], "--", color=f"C{2 * i + 1}", label="validation MSE" + suffix)
            if i > 0:
                ax.axvline(x0 + 0.5, color="grey", lw=0.8, ls=":")
            x0 = xs[-1]
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not (history and history[0]["phase"] == "components"):  # PCA's last point is exactly 0
        ax.set_yscale("log")
    ax.set_ylabel("mean squared error (normalised units)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if history and history[0]["phase"] != "components" and signed:
        tax.set_ylabel("training loss")
        h2, l2 = tax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def selection(candidates, chosen, title: str, path: str) -> None:
    """`select`'s evidence: held-back reconstruction error and ROC AUC on injected anomalies
    against the code size, one line per kind (and window), the chosen candidate starred."""
    fig, (err_ax, auc_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    lines: dict[str, list] = {}
    for c in candidates:
        if c.status == "ok":
            lines.setdefault(c.kind + (f" (window {c.window})" if c.window > 1 else ""), []).append(c)
    for i, (label, cs) in enumerate(lines.items()):
        cs = sorted(cs, key=lambda c: c.latent)
        xs = [c.latent for c in cs]
        err_ax.plot(xs, [c.val_mse for c in cs], "o-", color=f"C{i}", label=label)
        auc_ax.errorbar(xs, [c.roc_auc for c in cs], yerr=[c.roc_auc_se for c in cs], fmt="o-", capsize=3,
                        color=f"C{i}", label=label)
    auc_ax.plot([chosen.latent], [chosen.roc_auc], "*", ms=16, color="k", label=f"chosen: {chosen.name}")
    err_ax.set_ylabel("held-back reconstruction error (normal rows)")
    err_ax.set_yscale("log")
    auc_ax.set_ylabel("ROC AUC, injected anomalies (± 1 s.e.)")
    sizes = sorted({c.latent for c in candidates if c.status == "ok"})
    for ax in (err_ax, auc_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("code size (latent)")
        ax.grid(True, which="both", alpha=0.3)
    auc_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
