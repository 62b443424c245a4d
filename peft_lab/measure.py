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

import math

import torch
import torch.nn.functional as F

from . import data as data_mod
from .stats import (_T95, accuracy_interval, bits, compare, drift_sentence, fingerprint,  # noqa: F401
                    interval, mean_interval, paired_counts, paired_test, t95, verdict, versus, wilson)
from . import models, train
from .memory import BYTES, BYTES_PER_TRAINED, memory_table, predicted_memory  # noqa: F401  (memory lives in memory.py)
from .methods import freeze



def parameters(model) -> dict:
    """Trainable and total parameters (shared tensors counted once), and the trainable share."""
    counts = freeze.count(model)
    counts["share"] = counts["trainable"] / counts["total"]
    return counts


# --- task accuracy ------------------------------------------------------------------------------

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
