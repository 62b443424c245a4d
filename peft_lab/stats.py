"""Statistics, in a few lines each so they can be read: the Wilson interval of an accuracy, the exact McNemar
test of two runs scored on the same items, the t-interval of a mean over seeds, and the verdicts printed from
them ("higher", "lower", "no measurable difference"). Explained in notebook 01, section 3.

Written by hand to teach; ``tests/test_statistics.py`` checks each against scipy and statsmodels.
"""
from __future__ import annotations

import hashlib
import math


def wilson(correct: int, n: int, z: float = 1.96) -> tuple:
    """The 95 % Wilson interval of an accuracy of ``correct`` out of ``n`` (sound near 0 and 1, unlike +-2 SE)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson(correct={correct}, n={n}): an interval needs at least one answer and 0 <= correct "
                         "<= n (correct counts the right answers among n).")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bits(flags) -> str:
    """Right/wrong per item as a compact string ("1" right, "0" wrong), kept with a run's metrics so two runs
    scored on the same items can be compared item by item (``paired_test``)."""
    return "".join("1" if f else "0" for f in flags)


def fingerprint(texts) -> str:
    """A short hash naming a list of items, so a paired comparison can check that both runs saw the same ones."""
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def accuracy_interval(result: dict) -> tuple:
    """The 95 % Wilson interval of an ``accuracy`` result, or of a run's metrics (accuracy and test_n)."""
    n = result.get("n", result.get("test_n"))
    return wilson(round(result["accuracy"] * n), n)


def verdict(a: dict, b: dict) -> str:
    """"higher", "lower" or "no measurable difference": accuracy ``a`` against ``b`` (each an ``accuracy``
    result or a run's metrics). Two results scored on the same items are compared item by item
    (``paired_test``); otherwise by whether their 95 % intervals overlap (see ``compare``)."""
    return compare(a, b, "accuracy")


# Which item-by-item record a metric keeps, and the fingerprint of the items it was scored on.
_PAIRED = {"accuracy": ("correct", "items"), "kept_greedy": ("kept_greedy_bits", "probes_known_items")}


def paired_counts(a: dict, b: dict, metric: str = "accuracy"):
    """(items only ``a`` got right, items only ``b`` got right) when both results carry right/wrong per item
    for the same items; ``None`` otherwise (a mean over seeds, an old run log, different items)."""
    if metric not in _PAIRED:
        return None
    record, items = _PAIRED[metric]
    # a run's metrics name the test items with a "test_" prefix; an ``accuracy`` result without it
    rec_a, rec_b = (r.get(record, r.get("test_" + record)) for r in (a, b))
    ids_a, ids_b = (r.get(items, r.get("test_" + items)) for r in (a, b))
    if not rec_a or not rec_b or ids_a is None or ids_a != ids_b or len(rec_a) != len(rec_b):
        return None
    only_a = sum(x == "1" and y == "0" for x, y in zip(rec_a, rec_b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(rec_a, rec_b))
    return only_a, only_b


def paired_test(only_a: int, only_b: int) -> float:
    """Two-sided p-value of the exact McNemar test: the items on which two runs disagree are a fair coin's
    tosses if neither run is better. Items both get right (or both wrong) say nothing about which is better,
    so a paired test sees a difference that two overlapping intervals hide."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (``t95`` computes them beyond).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom: the table up to 30; beyond, the
    normal quantile corrected in powers of 1/df (Cornish-Fisher; within 1e-4 of the exact value from df 31 on).
    1.96 alone would be up to 4 % too narrow there."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least one degree of freedom, got {df}.")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_interval(values) -> dict:
    """Mean of several measurements (seeds, text chunks) with its 95 % t-interval: ``mean``, ``low``, ``high``, ``n``.
    One value has no spread to measure, so its interval is the value itself."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def interval(result: dict, metric: str = "accuracy") -> tuple:
    """(value, low, high): a measured number with its 95 % interval.

    ``result`` is a run's metrics (or an ``accuracy`` result), or a ``mean_interval`` over seeds.
    Accuracy: Wilson on the test items. Probes kept (``kept_greedy``, ``kept_logprob``): Wilson on the
    probes the base knew. ``kl``: the spread over the prose chunks it was measured on.
    """
    if "mean" in result:  # already a mean over seeds
        return result["mean"], result["low"], result["high"]
    value = result[metric]
    if metric == "accuracy":
        low, high = accuracy_interval(result)
    elif metric in ("kept_greedy", "kept_logprob"):
        known = result["probes_known_by_base"]
        low, high = wilson(round(value * known), known)
    elif metric == "kl" and "kl_low" in result:
        low, high = result["kl_low"], result["kl_high"]
    else:
        raise ValueError(f"No interval is measured for {metric!r}; use accuracy, kept_greedy, kept_logprob or kl.")
    return value, low, high


def compare(a: dict, b: dict, metric: str = "accuracy") -> str:
    """"higher", "lower" or "no measurable difference": ``metric`` of ``a`` against ``b``.

    Two results scored on the same items (accuracy on the same test items, probes kept of the same known
    probes) are compared item by item: the exact McNemar test at the 5 % level (``paired_test``). Otherwise
    (means over seeds, KL) by whether the two 95 % intervals overlap (see ``interval``), a cautious rule.
    Explained in notebook 01, section 3."""
    counts = paired_counts(a, b, metric)
    if counts is not None:
        only_a, only_b = counts
        if paired_test(only_a, only_b) < 0.05:
            return "higher" if only_a > only_b else "lower"
        return "no measurable difference"
    _, low_a, high_a = interval(a, metric)
    _, low_b, high_b = interval(b, metric)
    if low_a > high_b:
        return "higher"
    if high_a < low_b:
        return "lower"
    return "no measurable difference"


def versus(a: dict, b: dict, name: str, metric: str = "accuracy") -> str:
    """``compare`` as words to print: "higher than <name>", "lower than <name>" or "no measurable difference from <name>"."""
    word = compare(a, b, metric)
    return f"{word} from {name}" if word == "no measurable difference" else f"{word} than {name}"


def drift_sentence(a, b) -> str:
    """A sentence, from the numbers, on which of two runs moved further from the base model (KL on prose)."""
    word = compare(a.metrics, b.metrics, "kl")
    ka, kb = a.metrics["kl"], b.metrics["kl"]
    if word == "no measurable difference":
        return f"{a.label} and {b.label} drifted about as far from the base (KL {ka:.4f} vs {kb:.4f}: no measurable difference)."
    further = word == "higher"
    more, less = (a, b) if further else (b, a)
    ratio = more.metrics["kl"] / less.metrics["kl"] if less.metrics["kl"] > 0 else float("inf")
    return (f"{more.label} drifted further from the base than {less.label}: KL {more.metrics['kl']:.4f} vs "
            f"{less.metrics['kl']:.4f} ({ratio:.1f}x; the 95 % intervals do not overlap).")


# --- comparisons over seeds, each seed paired item by item (notebook 05_showdown) ---------------------

def paired_over_seeds(pairs, metric: str = "accuracy") -> dict:
    """Accuracy (or ``kept_greedy``, the fact probes kept) of method A against method B when each seed of A was
    scored on the same items as the same seed of B: ``pairs`` is a list of (A's metrics, B's metrics), one per seed.

    The items on which the two disagree are pooled over the seeds (``only_a``, ``only_b``) and tested with the
    exact McNemar test (``p``); ``diff`` is A's accuracy minus B's, with a 95 % interval that covers both the
    spread between seeds (a t-interval of the per-seed differences) and the finite test set (the paired
    standard error of the pooled items), whichever is wider. ``verdict``: "higher", "lower" or "no measurable
    difference" (McNemar at 5 %, and the interval must exclude 0 too when there are several seeds)."""
    if not pairs:
        raise ValueError("paired_over_seeds needs at least one (A, B) pair of runs scored on the same items.")
    only_a = only_b = n = 0
    diffs = []
    for a, b in pairs:
        counts = paired_counts(a, b, metric)
        if counts is None:
            raise ValueError(f"These runs were not scored on the same items for {metric!r}, so they cannot be paired; "
                             "compare their seed means with compare() instead.")
        only_a, only_b = only_a + counts[0], only_b + counts[1]
        items = a["probes_known_by_base"] if metric == "kept_greedy" else a.get("test_n", a.get("n"))
        n += items
        diffs.append((counts[0] - counts[1]) / items)
    diff = (only_a - only_b) / n
    item_se = math.sqrt(max(0.0, only_a + only_b - (only_a - only_b) ** 2 / n)) / n
    half = 1.959963984540054 * item_se
    spread = mean_interval(diffs)
    half = max(half, spread["high"] - spread["mean"])
    p = paired_test(only_a, only_b)
    excludes_zero = diff - half > 0 or diff + half < 0
    word = ("higher" if diff > 0 else "lower") if p < 0.05 and (len(pairs) == 1 or excludes_zero) else "no measurable difference"
    # a difference of two shares lies in [-1, 1]: an interval wider than that (few seeds far apart) is cut to it
    return {"diff": diff, "low": max(-1.0, diff - half), "high": min(1.0, diff + half), "only_a": only_a, "only_b": only_b, "n": n,
            "seeds": len(pairs), "p": p, "verdict": word}


def paired_items_needed(only_a: int, only_b: int, n: int, power_z: float = 0.8416) -> int | None:
    """About how many items (pooled over seeds) a paired test needs to call a gap of the size measured here at
    the 5 % level with 80 % power: the usual sample size of McNemar's test from the measured share of items on
    which the two disagree and the measured gap. None when the measured gap is zero (no size would show it)."""
    discordant, gap = (only_a + only_b) / n, abs(only_a - only_b) / n
    if gap == 0:
        return None
    z = 1.959963984540054
    return math.ceil(((z * math.sqrt(discordant) + power_z * math.sqrt(max(0.0, discordant - gap ** 2))) / gap) ** 2)


def seeds_needed(values_a, values_b, power_z: float = 0.8416) -> int | None:
    """About how many seeds per method would separate two means (KL, seconds) of the size and spread measured
    here (two-sample, 5 % level, 80 % power). None when either has a single value (no spread measured) or the
    means are equal."""
    if len(values_a) < 2 or len(values_b) < 2:
        return None
    ma, mb = sum(values_a) / len(values_a), sum(values_b) / len(values_b)
    var = lambda v, m: sum((x - m) ** 2 for x in v) / (len(v) - 1)  # noqa: E731
    sd = math.sqrt((var(values_a, ma) + var(values_b, mb)) / 2)
    if ma == mb:
        return None
    return max(2, math.ceil(2 * ((1.959963984540054 + power_z) * sd / abs(ma - mb)) ** 2))
