"""The loss-curve PNG written beside every model (NAME.onnx -> NAME.loss.png)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_png_path(model_path: str) -> str:
    root, _ = os.path.splitext(model_path)
    return root + ".loss.png"


def loss_curve(history: list[dict], title: str, path: str, calibration_p99: float | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if history and history[0]["phase"] == "components":  # PCA: error against components kept
        xs = [h["epoch"] for h in history]
        ax.plot(xs, [h["train"] for h in history], "o-", label="training MSE")
        ax.plot(xs, [h["val"] for h in history], "s-", label="validation MSE")
        ax.set_xlabel("principal components kept")
        ax.set_xticks(xs)
    else:
        x0 = 0
        phases = []
        for h in history:
            if not phases or phases[-1][0] != h["phase"]:
                phases.append((h["phase"], []))
            phases[-1][1].append(h)
        for i, (phase, rows) in enumerate(phases):
            xs = [x0 + r["epoch"] for r in rows]
            suffix = f" ({phase})" if len(phases) > 1 else ""
            ax.plot(xs, [r["train"] for r in rows], "-", color=f"C{2 * i}", label="training loss" + suffix)
            ax.plot(xs, [r["val"] for r in rows], "--", color=f"C{2 * i + 1}", label="validation MSE" + suffix)
            if i > 0:
                ax.axvline(x0 + 0.5, color="grey", lw=0.8, ls=":")
            x0 = xs[-1]
        ax.set_xlabel("epoch")
    if calibration_p99 is not None:
        ax.axhline(calibration_p99, color="red", lw=0.8, ls=":", label="validation score p99")
    ax.set_yscale("log")
    ax.set_ylabel("mean squared error (normalised units)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
