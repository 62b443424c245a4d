"""The workbook's figures (matplotlib). Each function draws on the axes it is given, or makes its own.

Used from notebook 00 onwards; every figure is drawn from measured run records, never typed-in numbers.
"""
from __future__ import annotations

import matplotlib.pyplot as plt

from . import measure

MEMORY_PARTS = ("weights", "gradients", "optimizer", "weight_casts", "activations")
COLORS = {"weights": "#8da0cb", "gradients": "#fc8d62", "optimizer": "#66c2a5", "weight_casts": "#ffd92f",
          "activations": "#e78ac3"}


def _axes(ax, size=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _label(run) -> str:
    return getattr(run, "label", None) or run.method


def loss_curves(runs, ax=None, smooth: int = 5):
    """Training loss against step, one line per run (a running mean over ``smooth`` steps)."""
    ax = _axes(ax)
    for run in runs if isinstance(runs, (list, tuple)) else [runs]:
        losses = run.losses
        k = max(1, min(smooth, len(losses)))
        mean = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), mean, label=_label(run))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss (running mean)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves stay visible
    return ax


def memory_breakdown(runs, ax=None):
    """Stacked bars of measured training memory per run, with the textbook prediction marked."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    ax = _axes(ax, (max(5, 1.6 * len(runs)), 3.8))
    mib = 2 ** 20
    for i, run in enumerate(runs):
        bottom = 0.0
        for part in MEMORY_PARTS:
            value = (run.memory.get(part) or 0) / mib  # older runs have no weight casts recorded
            ax.bar(i, value, bottom=bottom, color=COLORS[part], label=part.replace("_", " ") if i == 0 else None)
            bottom += value
        table = measure.memory_table(run)
        ax.plot([i - 0.4, i + 0.4], [table["textbook prediction MiB"]] * 2, "k--",
                label="textbook: 4 B per fp32 / 2 B per bf16 number + 12 B/trainable" if i == 0 else None)
    ax.set_xticks(range(len(runs)), [_label(r) for r in runs], rotation=20, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Training memory, measured in a real step")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar
    return ax


def comparison(runs, title: str = "Methods compared"):
    """Four panels: trainable parameters, test accuracy, seconds per step, forgetting (KL)."""
    rows = measure.comparison_rows(runs)
    labels = [_label(r) for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    panels = [("trainable", "trainable parameters (log)", True), ("accuracy", "test accuracy", False),
              ("s/step", "seconds per step", False), ("KL", "forgetting: KL(base || tuned) per token", False)]
    for ax, (key, name, log) in zip(axes, panels):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="#4c72b0")
        ax.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        if log:
            ax.set_yscale("log")
        if key == "accuracy":
            ax.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def scatter(runs, x: str, y: str, ax=None, annotate: bool = True):
    """One point per run: e.g. accuracy against forgetting, or accuracy against trainable parameters."""
    rows = measure.comparison_rows(runs)
    ax = _axes(ax, (5, 3.5))
    ax.scatter([r[x] for r in rows], [r[y] for r in rows])
    if annotate:
        for run, r in zip(runs, rows):
            ax.annotate(_label(run), (r[x], r[y]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    return ax


def sweep(values, results: dict, xlabel: str, ax=None, logx: bool = False):
    """Lines of several measured quantities against one swept setting (rank, prefix length ...)."""
    ax = _axes(ax)
    for name, ys in results.items():
        ax.plot(values, ys, "o-", label=name)
    ax.set_xlabel(xlabel)
    if logx:
        ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    return ax


def singular_values(matrices: dict, ax=None, top: int | None = 64):
    """Singular values of each matrix (e.g. a learned update B A), each divided by its largest, log scale.

    A rank-r matrix shows r values and then a cliff down to float rounding: the picture of "low rank".
    Explained in notebook 02_lora, section 7.
    """
    import torch

    ax = _axes(ax)
    for name, m in matrices.items():
        s = torch.linalg.svdvals(m.detach().float().cpu())
        s = (s / s[0]).clamp_min(1e-12)[:top]
        ax.semilogy(range(1, len(s) + 1), s.numpy(), "o-", markersize=3, label=name)
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value σ_i / σ_1")
    ax.set_title("Singular values")
    ax.legend(fontsize=8)
    return ax


def prefix_attention(weights, num_virtual_tokens: int, tokens=None, share_by_layer=None, layers=None, title: str = ""):
    """Where one attention head looks: its (T, P + T) attention matrix with the prefix columns marked,
    and the share of each token's attention that goes to the P prefix slots.

    ``weights`` comes from ``prefix.attention_weights``; ``share_by_layer`` (optional) is a list of the
    mean prefix share in every layer (or in ``layers``), drawn as a third panel. Explained in notebook 03_prefix_tuning,
    section 5.
    """
    w = weights.float().cpu()
    P, T = num_virtual_tokens, w.shape[0]
    ncols = 3 if share_by_layer is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8))
    im = axes[0].imshow(w, aspect="auto", cmap="viridis", vmin=0)
    axes[0].axvline(P - 0.5, color="w", lw=1.5)
    axes[0].set_xlabel(f"key position (0..{P - 1}: prefix | {P}..: real tokens)")
    axes[0].set_ylabel("query: real token")
    axes[0].set_title("attention probabilities", fontsize=10)
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    share = w[:, :P].sum(-1)
    axes[1].barh(range(T), share, color="#4c72b0")
    axes[1].set_xlim(0, 1)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("share of attention on the prefix")
    axes[1].set_title(f"mean over tokens: {float(share.mean()):.0%}", fontsize=10)
    if tokens is not None:
        labels = [repr(t)[1:-1] for t in tokens][:T]
        for ax in axes[:2]:
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if share_by_layer is not None:
        axes[2].plot(layers if layers is not None else range(len(share_by_layer)), share_by_layer, "o-")
        axes[2].set_ylim(0, 1)
        axes[2].set_xlabel("layer")
        axes[2].set_ylabel("mean share on the prefix")
        axes[2].set_title("the same head index, layer by layer", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def accuracy_intervals(runs, zero_shot: dict | None = None, ax=None, title: str = "Test accuracy with 95 % intervals"):
    """Each run's test accuracy as a dot with its 95 % Wilson interval, the zero-shot line (and its band)
    behind them, on a range that shows every interval whole but no more. Explained in notebook 06_beyond_lora, section 4."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    ax = _axes(ax, (max(5.5, 1.3 * len(runs)), 3.6))
    lows, highs = [], []
    for i, run in enumerate(runs):
        low, high = measure.accuracy_interval(run.metrics)
        acc = run.metrics["accuracy"]
        ax.errorbar(i, acc, yerr=[[acc - low], [high - acc]], fmt="o", color="#1b9e77", capsize=5)
        lows.append(low)
        highs.append(high)
    if zero_shot is not None:
        low, high = measure.accuracy_interval(zero_shot)
        ax.axhline(zero_shot["accuracy"], color="gray", ls="--", label=f"zero-shot {zero_shot['accuracy']:.1%}")
        ax.axhspan(low, high, color="gray", alpha=0.12, label="zero-shot 95 % interval")
        lows.append(low)
        highs.append(high)
    pad = 0.1 * (max(highs) - min(lows))
    ax.set_ylim(max(0.0, min(lows) - pad), min(1.0, max(highs) + pad))
    ax.set_xticks(range(len(runs)), [_label(r) for r in runs], rotation=20, ha="right")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    if zero_shot is not None:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
