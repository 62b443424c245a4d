"""The workbook's figures (matplotlib). Each function draws on the axes it is given, or makes its own.

Used from notebook 00 onwards; every figure is drawn from measured run records, never typed-in numbers.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker

from . import measure, runlog
from .train import MEMORY_PARTS  # one list of memory parts: train measures them

COLORS = {"weights": "#8da0cb", "gradients": "#fc8d62", "optimizer": "#66c2a5", "weight_casts": "#ffd92f",
          "activations": "#e78ac3", "recompute": "#c994c7"}


def _axes(ax, size=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _label(run) -> str:
    return getattr(run, "label", None) or run.method


def _running_mean(values, k):
    k = max(1, min(k, len(values)))
    return [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]


def loss_curves(runs, ax=None, smooth: int = 5, label_words: bool = False):
    """Training loss against step, one line per run (a running mean over ``smooth`` steps).

    With ``label_words`` each run also gets a dashed line: the loss over the label words alone (a choice
    among 2 or 6 words, what accuracy sees), beside the loss over the whole 49,152-token vocabulary that
    training minimises. Explained in notebook 00, section 4.
    """
    ax = _axes(ax)
    for run in runs if isinstance(runs, (list, tuple)) else [runs]:
        line, = ax.plot(range(1, len(run.losses) + 1), _running_mean(run.losses, smooth), label=_label(run))
        if label_words and getattr(run, "label_losses", None):
            ax.plot(range(1, len(run.label_losses) + 1), _running_mean(run.label_losses, smooth), "--",
                    color=line.get_color(), label=f"{_label(run)}: label words only")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("Loss (running mean)")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.85)  # the curves fall away from the top right
    return ax


def memory_breakdown(runs, ax=None):
    """Stacked bars of measured training memory per run, with the textbook prediction marked."""
    runs = runs if isinstance(runs, (list, tuple)) else [runs]
    ax = _axes(ax, (max(5, 1.6 * len(runs)), 3.8))
    mib = 2 ** 20
    # a part no run has (weight casts are made only under autocast) gets no legend entry
    parts = [p for p in MEMORY_PARTS if any(run.memory.get(p) for run in runs)]
    for i, run in enumerate(runs):
        bottom = 0.0
        for part in parts:
            value = (run.memory.get(part) or 0) / mib  # older runs have no weight casts recorded
            ax.bar(i, value, bottom=bottom, color=COLORS[part], label=part.replace("_", " ") if i == 0 else None)
            bottom += value
        table = measure.memory_table(run)
        ax.plot([i - 0.4, i + 0.4], [table["textbook prediction MiB"]] * 2, "k--",
                label="textbook: 4 B a fp32,\n2 B a bf16 number,\n+12 B a trained one" if i == 0 else None)
    ax.set_xticks(range(len(runs)), [_label(r) for r in runs], rotation=20, ha="right")
    ax.set_ylabel("MiB")
    ax.set_title("Training memory, measured in a real step")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: never over a bar
    return ax


def _interval_dots(ax, runs, metric: str, color: str):
    """Each run's ``metric`` as a dot with its 95 % interval whisker (see ``measure.interval``)."""
    lows, highs = [], []
    for i, run in enumerate(runs):
        value, low, high = measure.interval(run.metrics, metric)
        ax.errorbar(i, value, yerr=[[value - low], [high - value]], fmt="o", color=color, capsize=5)
        lows.append(low)
        highs.append(high)
    return lows, highs


def _fit_range(ax, lows, highs, floor=None, ceiling=None):
    """A y range that shows every interval whole and no more (a flat range still gets some height)."""
    pad = 0.1 * (max(highs) - min(lows)) or 0.01
    low, high = min(lows) - pad, max(highs) + pad
    ax.set_ylim(low if floor is None else max(floor, low), high if ceiling is None else min(ceiling, high))


def _zero_shot_band(ax, zero_shot, lows, highs):
    """The zero-shot line and its 95 % band behind accuracy dots, then a range that shows every interval whole."""
    if zero_shot is not None:
        value, low, high = measure.interval(zero_shot, "accuracy")
        ax.axhline(value, color="gray", ls="--")
        ax.axhspan(low, high, color="gray", alpha=0.12)
        lows, highs = lows + [low], highs + [high]
    _fit_range(ax, lows, highs, 0.0, 1.0)


def _bars_with_values(ax, values, fmt):
    bars = ax.bar(range(len(values)), values, color="#4c72b0")
    for bar, v in zip(bars, values):
        ax.annotate(fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, 1.15 * max(values))


def _trainable_share(ax, shares):
    """Trainable share per method on a log axis: 100 % and 0.005 % differ 20,000-fold, and on a linear axis every
    PEFT bar would be invisible. Each bar carries its number."""
    bars = ax.bar(range(len(shares)), shares, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_ylim(min(shares) / 3, 1000)  # room above 100 % for its label
    for bar, v in zip(bars, shares):
        ax.annotate(f"{v:.3g} %", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_title("trainable parameters, % of the model (log scale)", fontsize=10)


def _method_ticks(axes, labels):
    """The methods' names under every panel, on two lines ("LoRA r=8 (q,v)" / "lr 1e-3") so that long labels
    stay under their own panel instead of running into the next one."""
    wrapped = [label.replace(", lr ", "\nlr ") for label in labels]
    for ax in axes:
        ax.set_xticks(range(len(labels)), wrapped, rotation=30, ha="right", fontsize=7.5)
        ax.set_xlim(-0.6, len(labels) - 0.4)


def comparison(runs, title: str = "Methods compared", zero_shot: dict | None = None):
    """Four panels: trainable share, test accuracy (with 95 % intervals and the zero-shot line), seconds
    per step, forgetting (KL with its interval). Bars only for amounts, on linear axes, numbers on top."""
    rows = measure.comparison_rows(runs)
    labels = [_label(r) for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    _trainable_share(axes[0], [r["trainable %"] for r in rows])
    lows, highs = _interval_dots(axes[1], runs, "accuracy", "#1b9e77")
    _zero_shot_band(axes[1], zero_shot, lows, highs)
    axes[1].set_title("test accuracy, 95 % intervals" + (f"\n(dashed: zero-shot {zero_shot['accuracy']:.1%})"
                                                         if zero_shot is not None else ""), fontsize=10)
    _bars_with_values(axes[2], [r["s/step"] for r in rows], lambda v: f"{v:.2f}")
    axes[2].set_title("seconds per step", fontsize=10)
    if all("kl_low" in r.metrics for r in runs):
        lows, highs = _interval_dots(axes[3], runs, "kl", "#d95f02")
        _fit_range(axes[3], [0.0] + lows, highs, 0.0)
        axes[3].set_title("forgetting: KL(base || tuned), 95 % intervals", fontsize=10)
    else:  # runs logged before intervals were measured
        _bars_with_values(axes[3], [r["KL"] for r in rows], lambda v: f"{v:.4f}")
        axes[3].set_title("forgetting: KL(base || tuned) per token", fontsize=10)
    _method_ticks(axes, labels)
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


def sweep(values, results: dict, xlabel: str, ax=None, logx: bool = False, zero_shot: dict | None = None,
          from_zero: bool = False):
    """Lines of measured quantities against one swept setting (rank, prefix length ...).

    ``results`` maps a name to a list of numbers, or to a list of (value, low, high) triples, drawn with
    95 % interval whiskers (``measure.interval`` gives them). ``zero_shot`` adds the untrained model's line.
    ``from_zero`` starts the axis at 0 (a KL or a size: a cut axis would magnify small differences).
    """
    ax = _axes(ax)
    lows, highs = [], []
    for name, ys in results.items():
        if ys and isinstance(ys[0], (tuple, list)):
            mid = [y[0] for y in ys]
            ax.errorbar(values, mid, yerr=[[m - y[1] for m, y in zip(mid, ys)], [y[2] - m for m, y in zip(mid, ys)]],
                        fmt="o-", capsize=4, label=name)
            lows += [y[1] for y in ys]
            highs += [y[2] for y in ys]
        else:
            ax.plot(values, ys, "o-", label=name)
            lows += list(ys)
            highs += list(ys)
    if zero_shot is not None:
        value, low, high = measure.interval(zero_shot, "accuracy")
        ax.axhline(value, color="gray", ls="--", label=f"zero-shot {value:.1%}")
        ax.axhspan(low, high, color="gray", alpha=0.12)
        lows.append(low)
        highs.append(high)
    _fit_range(ax, lows, highs, floor=0.0 if from_zero else None)
    if from_zero:
        ax.set_ylim(bottom=0.0)
    ax.set_xlabel(xlabel)
    if len(results) == 1:
        ax.set_ylabel(next(iter(results)))
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
        labels = [repr(t)[1:-1] for t in tokens][:T]  # pass decoded text (tokenizer.decode per id), not BPE pieces
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


# --- seed means (notebook 05_showdown) ------------------------------------------------------------

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]  # colour-blind safe


def _mean_dot(ax, x, summary, color, **kw):
    m = summary["mean"]
    ax.errorbar(x, m, yerr=[[m - summary["low"]], [summary["high"] - m]], fmt="o", color=color, capsize=4, **kw)


def scorecard(rows: list, labels: list, zero_shot: dict | None = None, title: str = ""):
    """Four panels for seed-mean rows (``study.summarize``): trainable share, test accuracy and KL from the
    base (means with 95 % intervals over seeds; the zero-shot line and band), seconds per step. Explained in
    notebook 05_showdown, section 2."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    _trainable_share(axes[0], [r["trainable %"] for r in rows])
    lows, highs = [], []
    for i, r in enumerate(rows):
        _mean_dot(axes[1], i, r["accuracy"], PALETTE[0])
        lows.append(r["accuracy"]["low"])
        highs.append(r["accuracy"]["high"])
    _zero_shot_band(axes[1], zero_shot, lows, highs)
    axes[1].set_title("test accuracy, mean over seeds, 95 % intervals" +
                      (f"\n(dashed: zero-shot {zero_shot['accuracy']:.1%})" if zero_shot is not None else ""), fontsize=10)
    _bars_with_values(axes[2], [r["s_per_step"]["mean"] for r in rows], lambda v: f"{v:.2f}")
    axes[2].set_title("seconds per training step", fontsize=10)
    for i, r in enumerate(rows):
        _mean_dot(axes[3], i, r["kl"], PALETTE[1])
    axes[3].set_ylim(0, 1.1 * max(r["kl"]["high"] for r in rows))
    axes[3].set_title("forgetting: KL(base || tuned), 95 % intervals", fontsize=10)
    _method_ticks(axes, labels)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def frontier(rows: list, recipes: dict, task_name: str, zero_shot: dict | None = None,
             accuracy_label: str = "test accuracy"):
    """Learn against forget: one curve per method through its learning rates (seed means, 95 % intervals
    both ways), accuracy up, forgetting across: KL from the base (left panel, log scale: the learning rates
    spread it over decades) and the share of fact probes lost (right panel). Forgetting grows to the right in
    both. ``accuracy_label`` names the vertical axis ("facts learned" for new knowledge). Explained in notebook
    05_showdown, section 3."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    # metric -> (x label, the x value and its interval from a seed summary)
    panels = [("kl", "KL(base || tuned) per token, log scale: forgetting →",
               lambda s: (s["mean"], max(s["low"], s["mean"] / 10), s["high"])),  # a log axis cannot show 0
              ("kept_greedy", "share of the base's fact probes lost (greedy): forgetting →",
               lambda s: (1 - s["mean"], 1 - s["high"], 1 - s["low"]))]
    for panel, (metric, xlabel, x_of) in zip(axes, panels):
        for k, (color, (recipe, name)) in enumerate(zip(PALETTE, recipes.items())):
            mine = sorted((r for r in rows if r["recipe"] == recipe and r["task"] == task_name and metric in r),
                          key=lambda r: r["lr"])
            if not mine:
                continue
            xs_ = [x_of(r[metric]) for r in mine]
            xs, ys = [x for x, _, _ in xs_], [r["accuracy"]["mean"] for r in mine]
            panel.errorbar(xs, ys, xerr=[[x - low for x, low, _ in xs_], [high - x for x, _, high in xs_]],
                           yerr=[[y - r["accuracy"]["low"] for y, r in zip(ys, mine)], [r["accuracy"]["high"] - y for y, r in zip(ys, mine)]],
                           fmt="o-", color=color, capsize=2, elinewidth=0.7, ecolor=color + "99",  # faint whiskers:
                           markersize=6, zorder=3 + k, label=name)                            # the points stay seen
            ends = {0, len(mine) - 1}  # the curve runs through the rates in order: its two ends name the range
            for j, (x, y, r) in enumerate(zip(xs, ys, mine)):  # one method's labels above its points, the next one's below
                if j in ends:
                    panel.annotate(f"lr {runlog.short_number(r['lr'])}", (x, y), fontsize=7, textcoords="offset points",
                                   xytext=(5, 5 if k % 2 == 0 else -11), color=color, zorder=5)
        if zero_shot is not None:
            panel.axhline(zero_shot["accuracy"], color="gray", ls="--", label=f"zero-shot {zero_shot['accuracy']:.1%}")
        panel.set_xlabel(xlabel)
        panel.set_ylabel(f"{accuracy_label} (mean over seeds)")
    axes[0].set_xscale("log")
    axes[1].set_xlim(left=-0.01)  # shares lost start at 0
    axes[1].xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Learning against forgetting on {task_name}: each point one learning rate (the lowest and highest "
                 "labelled), 95 % intervals over seeds")
    fig.tight_layout()
    return fig


def low_data(rows: list, recipes: dict, sizes: list, zero_shot: dict | None = None, ax=None):
    """Test accuracy against the number of labelled training examples (log scale, one tick per size trained), one
    line per method, seed means with 95 % intervals; ``rows`` are ``study.summarize`` rows of tasks named
    "<task>, n train". Explained in notebook 05_showdown, section 4."""
    ax = _axes(ax, (7, 4))
    for k, (color, (recipe, name)) in enumerate(zip(PALETTE, recipes.items())):
        points = [(n, r["accuracy"]) for n in sizes for r in rows
                  if r["recipe"] == recipe and r["task"].endswith(f", {n} train")]
        if points:
            xs = [n * (1.04 if k % 2 else 1 / 1.04) for n, _ in points]  # side by side, so whiskers do not cross
            ys = [s["mean"] for _, s in points]
            ax.errorbar(xs, ys, yerr=[[y - s["low"] for y, (_, s) in zip(ys, points)], [s["high"] - y for y, (_, s) in zip(ys, points)]],
                        fmt="o-", color=color, capsize=4, label=name)
    if zero_shot is not None:
        ax.axhline(zero_shot["accuracy"], color="gray", ls="--", label=f"zero-shot {zero_shot['accuracy']:.1%}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("labelled training examples (each run: the same steps of 8)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("Accuracy with little data, 95 % intervals over seeds")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def paired_differences(results: list, title: str = "", ax=None):
    """A forest plot of paired gaps: one row per comparison ``(label, stats.paired_over_seeds result)``, the gap
    in accuracy points with its 95 % interval, and the line at 0 that a verdict asks the interval to clear.
    Filled dots are measurable differences (exact McNemar at 5 %), open ones are not. Explained in notebook
    05_showdown, section 2."""
    ax = _axes(ax, (7.5, 0.45 * len(results) + 1.2))
    for i, (label, r) in enumerate(results):
        y = len(results) - 1 - i
        measurable = r["verdict"] != "no measurable difference"
        color = PALETTE[0] if r["diff"] > 0 else PALETTE[1]
        ax.errorbar(100 * r["diff"], y, xerr=[[100 * (r["diff"] - r["low"])], [100 * (r["high"] - r["diff"])]],
                    fmt="o", color=color, mfc=color if measurable else "white", capsize=3)
        ax.annotate(f"{100 * r['diff']:+.1f}", (100 * r["high"], y), xytext=(4, -3), textcoords="offset points", fontsize=8)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(results)), [label for label, _ in reversed(results)], fontsize=8)
    ax.set_xlabel("accuracy gap in points, paired over seeds on the same test items (95 % interval)")
    ax.set_title(title or "Paired differences (filled: measurable at the 5 % level)", fontsize=10)
    ax.set_ylim(-0.7, len(results) - 0.3)
    return ax


def time_to_accuracy(timed: dict, names: dict, target: float, ax=None):
    """Validation accuracy against training seconds, one line per method: the mean over seeds at each measuring
    step (the seeds are measured at the same steps), with the seeds' range shaded; the target as a dashed line.
    ``timed``: recipe -> ``showdown.time_to_accuracy_over_seeds`` result. Explained in notebook 05_showdown, section 6."""
    ax = _axes(ax, (7, 4))
    for color, (recipe, t) in zip(PALETTE, timed.items()):
        curves = [one["curve"] for one in t["runs"]]
        points = min(len(c) for c in curves)
        seconds = [sum(c[i][0] for c in curves) / len(curves) for i in range(points)]
        accs = [[c[i][1] for c in curves] for i in range(points)]
        ax.plot(seconds, [sum(a) / len(a) for a in accs], "o-", color=color,
                label=f"{names.get(recipe, recipe)}, lr {runlog.short_number(t['lr'])} (mean of {len(curves)} seeds)")
        ax.fill_between(seconds, [min(a) for a in accs], [max(a) for a in accs], color=color, alpha=0.15, lw=0)
    ax.axhline(target, color="gray", ls="--", label=f"target {target:.1%}")
    ax.set_xlabel("training seconds (measuring excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Time to accuracy: mean over seeds, shaded from the lowest to the highest seed")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def planner_bars(model: str, precision: str, batch: int, seq_len: int, highlight: str | None = None, ax=None,
                 **settings):
    """A stacked bar per method (GiB by part) at one base precision, with the free T4's 14.75 GiB as a line and what
    is left of it beside the CUDA context. ``settings`` go to ``planner.predict`` (``checkpointing``, ``loss``)."""
    from . import planner

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.5))
    labels = []
    for i, method in enumerate(planner.METHODS):
        p = "bf16" if method == "full" and precision == "4-bit" else precision
        pred, bottom = planner.predict(model, method, p, batch, seq_len, **settings), 0.0
        for part in (*planner.PARTS, "recompute"):
            ax.bar(i, pred[part] / planner.GiB, bottom=bottom, color=COLORS[part], label=part.replace("_", " ") if i == 0 else None)
            bottom += pred[part] / planner.GiB
        if method == highlight:  # the chosen method: one outline around its whole bar
            ax.bar(i, bottom, fill=False, edgecolor="black", linewidth=1.5)
        labels.append(f"{method}\n{p} compute" if method == "full" else f"{method}\n{p} base")
    ax.axhline(planner.T4_BYTES / planner.GiB, color="#b00", linestyle="--", linewidth=1, label=f"free T4 ({planner.gib(planner.T4_BYTES)} GiB)")
    usable = planner.T4_BYTES - planner.CUDA_CONTEXT_BYTES
    ax.axhline(usable / planner.GiB, color="#b00", linestyle=":", linewidth=1,
               label=f"less the CUDA context ({planner.gib(usable)} GiB)")
    ax.set_xticks(range(len(planner.METHODS)), labels, fontsize=8)
    ax.set_ylabel("GiB per training step")
    ax.set_title(f"{model}, batch {batch} x {seq_len} tokens (predicted)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    plt.show()
    return ax


def chat_results(graded: dict, forgot: dict, zero_shot: dict):
    """Notebook 08's figure, a dot per seed: exact and well-formed test answers with their 95 % Wilson intervals
    (the zero-shot line behind them), the KL on prose with its interval, and the share of probes kept. ``graded``
    and ``forgot`` map a method's name to its seeds' ``chat.evaluate`` and ``measure.forgetting`` results."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(graded)
    for i, name in enumerate(names):
        for j, g in enumerate(graded[name]):
            for k, (key, word, color) in enumerate((("accuracy", "exact", PALETTE[0]), ("format", "well-formed", PALETTE[2]))):
                value = g[key]
                low, high = measure.wilson(round(value * g["n"]), g["n"])
                axes[0].errorbar(i + (k - 0.5) * 0.3 + j * 0.08, value, yerr=[[value - low], [high - value]], fmt="o",
                                 color=color, capsize=3, label=word if i == 0 and j == 0 else None)
        for j, f in enumerate(forgot[name]):
            axes[1].errorbar(i + j * 0.08, f["kl"], yerr=[[f["kl"] - f["kl_low"]], [f["kl_high"] - f["kl"]]], fmt="o",
                             color=PALETTE[1], capsize=3)
            axes[2].plot(i + j * 0.08, f["kept_greedy"], "o", color=PALETTE[3])
    axes[0].axhline(zero_shot["accuracy"], color="gray", ls="--", label=f"zero-shot exact {zero_shot['accuracy']:.0%}")
    axes[0].axhline(zero_shot["format"], color="gray", ls=":", label=f"zero-shot well-formed {zero_shot['format']:.0%}")
    axes[0].set_ylim(-0.03, 1.03)
    axes[0].set_title("test answers, 95 % intervals", fontsize=10)
    axes[0].legend(fontsize=7.5, loc="best")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title("forgetting: KL(base || tuned) on prose", fontsize=10)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("probes the base knew, still answered", fontsize=10)
    _method_ticks(axes, names)
    fig.suptitle("Instruction tuning, each seed a dot")
    fig.tight_layout()
    return fig
