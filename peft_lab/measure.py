"""Measurements: parameters, memory, speed, task accuracy and forgetting.

Explained in notebooks 00 (memory anatomy, baselines) and 01 (forgetting).

Forgetting is measured by putting the same questions to the frozen base model and to the tuned one:

* fact probes ("The capital of France is" -> "Paris"): of the probes the *base* model gets right,
  the share the tuned model still gets right, scored two ways: by the greedy answer (every answer
  token is the argmax) and by the log-probability of the right answer (a continuous score that
  moves long before a greedy answer flips);
* perplexity on general prose the task never shows;
* the KL divergence KL(base || tuned) of next-token distributions on that prose: how far the
  tuned model's predictions drift from the base model's, token by token.

A prefix or soft prompt is active on every input, so it is measured *with* the method on: that is
how a tuned model is used, and it is the fair comparison with LoRA and full fine-tuning, which
change the model for every input too.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import models, train
from .methods import freeze



def parameters(model) -> dict:
    """Trainable and total parameters (shared tensors counted once), and the trainable share."""
    counts = freeze.count(model)
    counts["share"] = counts["trainable"] / counts["total"]
    return counts


# --- task accuracy ------------------------------------------------------------------------------

def wilson(correct: int, n: int, z: float = 1.96) -> tuple:
    """The 95 % Wilson interval of an accuracy of ``correct`` out of ``n`` (sound near 0 and 1, unlike +-2 SE)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson(correct={correct}, n={n}): an interval needs at least one answer and 0 <= correct "
                         "<= n (correct counts the right answers among n).")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def accuracy(tuned, tokenizer, task, split: str = "test", limit: int | None = None, batch_size: int = 16,
             max_length: int = 64) -> dict:
    """Accuracy on ``task``'s ``split``: argmax over the verbalizer tokens at the label position.

    For a text task (``data.fact_task``) the split holds questions, and the accuracy is the share answered
    right by the greedy answer (``score_probes``)."""
    examples = getattr(task, split)[:limit] if limit else getattr(task, split)
    if not examples:
        raise ValueError(f"Task {task.name!r} has no {split!r} examples to measure.")
    items = fingerprint(str(e) for e in examples)
    if task.is_text:
        right = [s["greedy_right"] for s in score_probes(tuned, tokenizer, examples)]
        return {"accuracy": sum(right) / len(right), "n": len(right), "predictions": right,
                "correct": bits(right), "items": items}
    device = data_mod.device_of(tuned)
    verbal = torch.tensor(data_mod.verbalizer_ids(task, tokenizer), device=device)
    tuned.eval()
    predictions, right = [], []
    loss_full = loss_label = mass = 0.0
    for batch in data_mod.batches(examples, task, tokenizer, batch_size, max_length):
        batch = data_mod.to_device(batch, device)
        with models.autocast(device):  # the precision training ran in (a no-op in fp32)
            logits = train.label_logits(tuned, batch).float()
        scores = logits[:, verbal]
        pred = scores.argmax(-1)
        predictions += pred.tolist()
        right += (pred == batch["label"]).tolist()
        # the two losses of notebook 00, section 4: over the whole vocabulary (what training minimises)
        # and over the label words alone (what accuracy sees); and the probability left for the label words
        loss_full += float(F.cross_entropy(logits, batch["target"], reduction="sum"))
        loss_label += float(F.cross_entropy(scores, batch["label"], reduction="sum"))
        mass += float(logits.softmax(-1)[:, verbal].sum())
    n = len(examples)
    return {"accuracy": sum(right) / n, "n": n, "predictions": [task.labels[i] for i in predictions],
            "correct": bits(right), "items": items,
            "loss_full_vocabulary": loss_full / n, "loss_label_words": loss_label / n, "label_word_mass": mass / n}


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


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (beyond that, the normal 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


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
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
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


# --- forgetting ---------------------------------------------------------------------------------

def _probe_rows(tokenizer, probes):
    rows = []
    for p in probes:
        prompt = tokenizer(p["prompt"], add_special_tokens=False).input_ids
        full = tokenizer(p["prompt"] + " " + p["answer"], add_special_tokens=False).input_ids
        if full[: len(prompt)] != prompt:  # rare tokeniser merges across the boundary
            answer = tokenizer(" " + p["answer"], add_special_tokens=False).input_ids
            full = prompt + answer
        rows.append((full, len(prompt)))
    return rows


@torch.no_grad()
def score_probes(model, tokenizer, probes, batch_size: int = 32) -> list:
    """For each probe: is the greedy answer right, and the log-probability of the right answer.

    One teacher-forced forward pass per batch does both: the greedy answer equals the right one
    exactly when every answer token is the argmax given the tokens before it.
    """
    device = data_mod.device_of(model)
    model.eval()
    out = []
    rows = _probe_rows(tokenizer, probes)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (full, _) in enumerate(chunk):
            ids[i, : len(full)] = torch.tensor(full)
            mask[i, : len(full)] = 1
        with models.autocast(device):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = logits.float().log_softmax(-1).cpu()
        for i, (full, n_prompt) in enumerate(chunk):
            positions = torch.arange(n_prompt - 1, len(full) - 1)
            answer = torch.tensor(full[n_prompt:])
            step = logprobs[i, positions]
            out.append({"greedy_right": bool((step.argmax(-1) == answer).all()),
                        "logprob": float(step.gather(1, answer[:, None]).sum())})
    return out


def prose_chunks(tokenizer, prose: str, max_tokens: int, chunk: int = 256) -> list:
    ids = tokenizer(prose, add_special_tokens=False).input_ids[:max_tokens]
    return [ids[i: i + chunk] for i in range(0, len(ids), chunk) if len(ids[i: i + chunk]) > 1]


_BASE_CACHE = {"model": None, "stamp": None, "chunks": {}, "probes": {}}


def _base_cache(base) -> dict:
    """What has been measured on the frozen ``base`` already: its log-probabilities per chunk of prose and its
    probe scores per probe set. Measured once and reused for every run a notebook or a grid measures (the base
    never changes), which halves the cost of each forgetting measurement.

    The cache holds one model, by identity, and is dropped when any of its weights is changed in place
    (torch counts in-place writes in each tensor's ``_version``)."""
    stamp = sum(p._version for p in base.parameters())
    if _BASE_CACHE["model"] is not base or _BASE_CACHE["stamp"] != stamp:
        _BASE_CACHE.update(model=base, stamp=stamp, chunks={}, probes={})
    return _BASE_CACHE


def _base_logprobs(base, x):
    """The frozen base model's log-probabilities on one chunk of prose, computed once per chunk (``_base_cache``)."""
    chunks = _base_cache(base)["chunks"]
    key = tuple(x[0].tolist())
    if key not in chunks:
        chunks[key] = base(input_ids=x).logits[0, :-1].float().log_softmax(-1)
    return chunks[key]


def base_probe_scores(base, tokenizer, probes) -> list:
    """``score_probes(base, ...)``, computed once per base model and probe set (keyed by the probes' fingerprint)."""
    scores = _base_cache(base)["probes"]
    key = fingerprint(p["prompt"] + " " + p["answer"] for p in probes)
    if key not in scores:
        scores[key] = score_probes(base, tokenizer, probes)
    return scores[key]


@torch.no_grad()
def prose_stats(base, tuned, tokenizer, prose: str, max_tokens: int) -> dict:
    """Perplexity of both models on ``prose`` and the mean per-token KL(base || tuned), with its 95 % interval."""
    device = data_mod.device_of(tuned)
    nll_base = nll_tuned = kl = 0.0
    n = 0
    chunk_kl = []
    for ids in prose_chunks(tokenizer, prose, max_tokens):
        x = torch.tensor([ids], device=device)
        target = x[0, 1:]
        with models.autocast(device):
            lp_base = _base_logprobs(base, x)
            lp_tuned = tuned(input_ids=x).logits[0, :-1].float().log_softmax(-1)
        nll_base -= float(lp_base.gather(1, target[:, None]).sum())
        nll_tuned -= float(lp_tuned.gather(1, target[:, None]).sum())
        piece = float(F.kl_div(lp_tuned, lp_base, log_target=True, reduction="sum"))
        kl += piece
        chunk_kl.append(piece / len(target))
        n += len(target)
    # the spread of KL between chunks of different prose gives the interval (a mean over chunks)
    spread = mean_interval(chunk_kl)
    half = (spread["high"] - spread["low"]) / 2
    return {"ppl_base": math.exp(nll_base / n), "ppl_tuned": math.exp(nll_tuned / n), "kl": kl / n,
            "kl_low": max(0.0, kl / n - half), "kl_high": kl / n + half, "prose_tokens": n}


def eval_sizes() -> dict:
    """How much of the forgetting material to use: all of it, or a slice in quick mode."""
    return {"prose_tokens": 512} if data_mod.quick_mode() else {"prose_tokens": 4096}


def probe_set() -> list:
    """The probes the measurements use: all of them, or in quick mode every fifth (all topics stay in)."""
    probes = data_mod.load_probes()
    return probes[::5] if data_mod.quick_mode() else probes


def forgetting(base, tuned, tokenizer, probes=None, prose: str | None = None, base_scores=None,
               prose_tokens: int | None = None) -> dict:
    """How much of what ``base`` knew ``tuned`` still knows. Explained in notebook 01, "Forgetting".

    ``base_scores`` (from ``score_probes(base, ...)``) can be passed to avoid scoring the base twice.
    ``prose_tokens`` measures the KL on less prose than ``eval_sizes`` gives (a grid of many runs).
    """
    sizes = eval_sizes() | ({"prose_tokens": prose_tokens} if prose_tokens else {})
    probes = probes if probes is not None else probe_set()
    prose = prose if prose is not None else data_mod.load_prose()
    base_scores = base_scores or base_probe_scores(base, tokenizer, probes)
    tuned_scores = score_probes(tuned, tokenizer, probes)
    known = [i for i, s in enumerate(base_scores) if s["greedy_right"]]
    kept = [i for i in known if tuned_scores[i]["greedy_right"]]
    # "Still more likely than the base thought it" is too strict; a probe counts as kept by
    # log-probability when the right answer lost less than one nat (a factor e in probability).
    kept_lp = [i for i in known if tuned_scores[i]["logprob"] > base_scores[i]["logprob"] - 1.0]
    drop = [base_scores[i]["logprob"] - tuned_scores[i]["logprob"] for i in known]
    return {
        "probes_known_by_base": len(known),
        "probes_known_items": fingerprint(probes[i]["prompt"] for i in known),
        "kept_greedy_bits": bits(tuned_scores[i]["greedy_right"] for i in known),
        "probes_total": len(probes),
        "kept_greedy": len(kept) / len(known) if known else float("nan"),
        "kept_logprob": len(kept_lp) / len(known) if known else float("nan"),
        "answer_logprob_drop": sum(drop) / len(drop) if drop else float("nan"),
        **prose_stats(base, tuned, tokenizer, prose, sizes["prose_tokens"]),
    }


@torch.no_grad()
def answers(model, tokenizer, prompts, max_new_tokens: int = 6) -> list:
    """Greedy continuations, one prompt at a time, for reading side by side."""
    device = data_mod.device_of(model)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        with models.autocast(device):
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
    return out


# --- memory -------------------------------------------------------------------------------------

# 4-bit: QLoRA's NF4 with double quantisation (Dettmers et al. 2023, section 3): half a byte a number, one 8-bit
# scale per block of 64, and one fp32 scale per 256 of those: 0.5 + 1/64 + 4/(64 x 256), about 0.516 B. (Without
# double quantisation, one fp32 scale per 64: 0.5625 B.)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "4-bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
BYTES_PER_TRAINED = 4 + 8  # an fp32 gradient and AdamW's two fp32 moments, per trainable number


def predicted_memory(total: int, trainable: int) -> dict:
    """Textbook MiB of weights + gradients + AdamW for each way of storing the frozen base.

    Trained numbers are always fp32 (4 bytes) with a 4-byte gradient and 8 bytes of AdamW state.
    The frozen rest costs 4 bytes a number in fp32, 2 in bf16, and about 0.516 in 4-bit NF4 (QLoRA: half
    a byte plus a scale per block of 64). Full fine-tuning has no frozen rest: its 16 bytes per number
    do not shrink with a half-precision base (the master weights stay fp32). Explained in notebook 00, section 6.
    """
    frozen = total - trainable
    return {f"frozen base in {name}": (BYTES[name] * frozen + (4 + BYTES_PER_TRAINED) * trainable) / 2 ** 20
            for name in ("float32", "bfloat16", "4-bit")}


def memory_table(run) -> dict:
    """A run's memory breakdown in MiB, with the textbook prediction beside the measurement.

    Textbook: each stored number costs its dtype's bytes (4 in fp32, 2 in bf16/fp16), plus, per
    *trainable* number, a 4-byte gradient and AdamW's two 4-byte moments. Full fine-tuning in fp32:
    16 bytes per parameter plus activations. Under autocast, the half-precision copies of the
    weights that a step makes are shown as "weight casts", not as activations.
    """
    m = run.memory if hasattr(run, "memory") else run["memory"]
    trainable = run.trainable_params if hasattr(run, "trainable_params") else run["trainable_params"]
    total = run.total_params if hasattr(run, "total_params") else run["total_params"]
    mib = 2 ** 20
    stored = m.get("weight_dtypes") or {"float32": total}
    predicted = (sum(BYTES[d] * n for d, n in stored.items()) + BYTES_PER_TRAINED * trainable) / mib
    optimizer = m.get("optimizer") or 0
    measured_static = (m["weights"] + m["gradients"] + optimizer) / mib
    return {
        "weights MiB": m["weights"] / mib,
        "gradients MiB": m["gradients"] / mib,
        "optimizer MiB": optimizer / mib,
        "weight casts MiB": m.get("weight_casts", 0) / mib,
        "activations MiB": m["activations"] / mib,
        "weights+grads+optimizer MiB": measured_static,
        "textbook prediction MiB": predicted,
        "process peak MiB": m["process_peak"] / mib,
    }


# --- everything at once -------------------------------------------------------------------------

def evaluate_run(run, base, tuned, tokenizer, task, base_scores=None, limit: int | None = None,
                 probes=None, prose_tokens: int | None = None) -> dict:
    """Accuracy and forgetting of a finished run, stored in ``run.metrics`` and the run log.

    ``probes`` (with ``base_scores`` of the same probes) and ``prose_tokens`` measure forgetting on less
    material, for a grid of many runs (``study.run``)."""
    limit = limit if limit is not None else (48 if data_mod.quick_mode() else None)
    acc = accuracy(tuned, tokenizer, task, "test", limit=limit)
    forgot = forgetting(base, tuned, tokenizer, probes=probes, base_scores=base_scores, prose_tokens=prose_tokens)
    run.metrics = {"accuracy": acc["accuracy"], "test_n": acc["n"], "test_correct": acc["correct"],
                   "test_items": acc["items"], **forgot}
    train.save_run(run)
    return run.metrics


def comparison_rows(runs) -> list:
    """One flat dict per run for tables and plots."""
    rows = []
    for r in runs:
        mem = memory_table(r)
        rows.append({
            "method": r.method, "trainable": r.trainable_params, "trainable %": 100 * r.trainable_params / r.total_params,
            "accuracy": r.metrics.get("accuracy", float("nan")), "s/step": r.seconds_per_step,
            "tokens/s": r.tokens_per_second, "train MiB": mem["weights+grads+optimizer MiB"] + mem["weight casts MiB"] + mem["activations MiB"],
            "kept (greedy)": r.metrics.get("kept_greedy", float("nan")),
            "kept (logprob)": r.metrics.get("kept_logprob", float("nan")),
            "KL": r.metrics.get("kl", float("nan")), "ppl": r.metrics.get("ppl_tuned", float("nan")),
            "run": r.run_id,
        })
    return rows
