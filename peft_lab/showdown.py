"""The measurements of notebook 05_showdown that a study grid (``study``) does not make: checkpoint size,
inference latency, one base serving many tasks (adapter swaps, a mixed batch of soft prompts, storage),
time to a target accuracy, and the verdicts drawn from a grid's seed means.

Every function measures on the model it is given; none returns a typed-in number.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import data as data_mod
from . import measure, models, recipes, runlog, study, train
from .methods import lora
from .methods import prompt as prompt_mod

NAMES = recipes.NAMES  # what a learner calls each recipe in tables and figures


def folder_bytes(folder) -> int:
    """Bytes of every file under ``folder``: what a checkpoint costs on disk."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def save_checkpoint(tuned, folder) -> Path:
    """Save what a run must keep to be used again: the adapter for a PEFT method (HF peft's layout), the
    trained tensors for a freezing choice (the frozen rest is the base), the whole model for full fine-tuning."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from . import methods

    method = (getattr(tuned, "peft_lab_info", None) or {}).get("method")
    if method in methods.names():  # every registered method saves itself, in peft's layout where peft has it
        methods.get(method).save(tuned, folder)
    else:
        from safetensors.torch import save_file
        trained = {n: p.detach().contiguous() for n, p in tuned.named_parameters() if p.requires_grad}
        if len(trained) == len(list(tuned.parameters())):  # full fine-tuning: every weight changed
            tuned.save_pretrained(folder, safe_serialization=True)
        else:
            save_file(trained, str(folder / "trained_weights.safetensors"))
    return folder


def checkpoint_bytes(tuned) -> int:
    """Measured size on disk of ``tuned``'s checkpoint (see ``save_checkpoint``)."""
    with tempfile.TemporaryDirectory() as tmp:
        return folder_bytes(save_checkpoint(tuned, tmp))


@torch.no_grad()
def latency(tuned, tokenizer, task, batch_size: int = 16, repeats: int = 5) -> float:
    """Median seconds for one forward pass over ``batch_size`` test examples (after one warm-up pass):
    what answering costs once training is done."""
    batch = data_mod.encode(task.test[:batch_size], task, tokenizer, device=tuned)
    tuned.eval()
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        with models.autocast(data_mod.device_of(tuned)):
            train.label_logits(tuned, batch)
        if data_mod.device_of(tuned).type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first pass pays one-off costs
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def recipe_costs(recipes, base, tokenizer, task, **timing) -> dict:
    """recipe -> {checkpoint bytes, latency seconds} for an untrained model of each recipe (neither depends on
    what training writes into the weights); LoRA also merged into its base, where it costs nothing extra.
    ``timing`` goes to ``latency`` (batch_size, repeats). Explained in notebook 05_showdown, section 2."""
    costs = {"zero-shot": {"checkpoint_bytes": 0, "latency_s": latency(base, tokenizer, task, **timing)}}
    for recipe in recipes:
        tuned = study.RECIPES[recipe](base, tokenizer, task.name)
        costs[recipe] = {"checkpoint_bytes": checkpoint_bytes(tuned), "latency_s": latency(tuned, tokenizer, task, **timing)}
        if recipe.startswith("lora"):
            lora.merge(tuned)
            costs[recipe]["latency_merged_s"] = latency(tuned, tokenizer, task, **timing)
        del tuned
    return costs


# --- reading a grid ------------------------------------------------------------------------------

def best_by_validation(rows, recipe: str, task_name: str):
    """The summary row (``study.summarize``) of ``recipe`` on ``task_name`` with the highest mean validation
    accuracy: the learning rate a learner would pick without looking at the test split. Explained in notebook
    05_showdown, section 2."""
    mine = [r for r in rows if r["recipe"] == recipe and r["task"] == task_name and "val_accuracy" in r]
    if not mine:
        raise ValueError(f"No runs of {recipe!r} on {task_name!r} with a validation accuracy in these rows.")
    return max(mine, key=lambda r: r["val_accuracy"]["mean"])


def fmt(summary: dict, percent: bool = True) -> str:
    """A seed mean with its 95 % interval, e.g. "81.3 % [78.0, 84.6]"."""
    if percent:
        return f"{summary['mean']:.1%} [{summary['low']:.1%}, {summary['high']:.1%}]"
    return f"{summary['mean']:.4f} [{summary['low']:.4f}, {summary['high']:.4f}]"


def frontier_verdicts(rows, a: str, b: str, task_name: str, runs=None) -> list:
    """Sentences, from the seed means, on how ``a`` and ``b`` trade learning against forgetting.

    1. Each at its best learning rate (chosen on validation): accuracy and KL compared.
    2. Every pair of points (one learning rate of each) whose accuracies show no measurable difference:
       which forgot more (KL), so the methods are compared at equal learning, not at one recipe each.
    With the seed ``runs`` behind ``rows``, accuracy and probes kept are compared item by item, seed by seed
    (``showdown_grid.paired``); KL, and rows without runs, by their 95 % intervals.
    Explained in notebook 05_showdown, section 3."""
    from .showdown_grid import paired, runs_of

    def compare(ra, rb, metric):
        if runs is not None and metric in ("accuracy", "kept_greedy"):
            result = paired(runs_of(runs, ra["recipe"], ra["lr"], task_name), runs_of(runs, rb["recipe"], rb["lr"], task_name), metric)
            if result is not None:
                return result["verdict"]
        return measure.compare(ra[metric], rb[metric], metric)

    def versus(ra, rb, metric):
        word = compare(ra, rb, metric)
        return f"{word} from {name_b}" if word == "no measurable difference" else f"{word} than {name_b}"

    name_a, name_b = NAMES.get(a, a), NAMES.get(b, b)
    best_a, best_b = best_by_validation(rows, a, task_name), best_by_validation(rows, b, task_name)
    lines = [f"At its best learning rate (by validation), {name_a} (lr {runlog.short_number(best_a['lr'])}) reached "
             f"{fmt(best_a['accuracy'])}: {versus(best_a, best_b, 'accuracy')} "
             f"(lr {runlog.short_number(best_b['lr'])}, {fmt(best_b['accuracy'])}); its KL from the base was "
             f"{versus(best_a, best_b, 'kl')} ({best_a['kl']['mean']:.4f} vs {best_b['kl']['mean']:.4f})"
             + (f"; the share of the base's probes it kept (greedy) was "
                f"{versus(best_a, best_b, 'kept_greedy')} "
                f"({fmt(best_a['kept_greedy'])} vs {fmt(best_b['kept_greedy'])})" if "kept_greedy" in best_a and "kept_greedy" in best_b else "")
             + "."]
    # KL and probes kept can disagree (KL sees every prose token move a little; a probe counts only when its
    # answer flips), so both are counted
    matched = {"higher": 0, "lower": 0, "no measurable difference": 0}
    kept = {"higher": 0, "lower": 0, "no measurable difference": 0}
    for ra in (r for r in rows if r["recipe"] == a and r["task"] == task_name):
        for rb in (r for r in rows if r["recipe"] == b and r["task"] == task_name):
            if compare(ra, rb, "accuracy") == "no measurable difference":
                matched[compare(ra, rb, "kl")] += 1
                if "kept_greedy" in ra and "kept_greedy" in rb:
                    kept[compare(ra, rb, "kept_greedy")] += 1
    pairs = sum(matched.values())
    if pairs:
        lines.append(f"Of the {pairs} pair{'s' if pairs != 1 else ''} of learning rates where the two reached accuracies with no measurable "
                     f"difference, {name_a} drifted further (higher KL) in {matched['higher']}, less far in "
                     f"{matched['lower']}, and no measurably different in {matched['no measurable difference']}.")
        if sum(kept.values()):
            lines.append(f"In the same pairs, {name_a} kept more of the base's probes in {kept['higher']}, fewer in "
                         f"{kept['lower']}, and no measurably different in {kept['no measurable difference']}.")
    else:
        lines.append(f"No learning rate of {name_a} matched one of {name_b} in accuracy, so the grid cannot "
                     "compare their forgetting at equal learning.")
    return lines


# --- one base, many tasks ------------------------------------------------------------------------

def train_lora_adapters(shared, tokenizer, tasks: dict, folder, steps: int, lr: float, seed: int = 0) -> dict:
    """One LoRA adapter (r=8, all linear layers) per task, each trained on the same loaded ``shared`` model
    (applied, trained, saved, removed: the base weights never change). Returns task -> (folder, run).
    Explained in notebook 05_showdown, section 5."""
    adapters = {}
    for name, task in tasks.items():
        torch.manual_seed(seed)
        tuned = lora.apply(shared, rank=8, alpha=16, targets="all-linear")
        run = train.fit(tuned, tokenizer, task, steps=steps, lr=lr, seed=seed, tag="showdown:adapter",
                        label=f"LoRA r=8 all-linear for {name}, lr {runlog.short_number(lr)}", log=False)
        where = Path(folder) / name
        lora.save(tuned, where)
        adapters[name] = (where, run)
        lora.remove(shared)
    return adapters


def swap_and_measure(shared, tokenizer, adapters: dict, tasks: dict, limit: int, rounds: int = 3) -> dict:
    """Load each adapter onto ``shared`` in turn, ``rounds`` times over, timing load and removal, and measure
    its accuracy each time. Returns task -> {swap seconds (median), accuracies (one per round)}."""
    out = {name: {"swap_s": [], "accuracy": []} for name in adapters}
    for _ in range(rounds):
        for name, (folder, _) in adapters.items():
            started = time.perf_counter()
            lora.load(shared, folder)
            out[name]["swap_s"].append(time.perf_counter() - started)
            out[name]["accuracy"].append(measure.accuracy(shared, tokenizer, tasks[name], limit=limit)["accuracy"])
            started = time.perf_counter()
            lora.remove(shared)
            out[name]["swap_s"][-1] += time.perf_counter() - started
    for name in out:
        out[name]["swap_s"] = statistics.median(out[name]["swap_s"])
    return out


@torch.no_grad()
def mixed_prompt_label_logits(base, prompts: list, batch: dict) -> torch.Tensor:
    """Label logits for a batch whose rows belong to different tasks: row i runs behind soft prompt
    ``prompts[i]`` (each P x d, the same P), all rows in ONE forward pass of the shared frozen base.

    This is ``PromptTuned.forward`` with one prompt per row instead of one for the batch."""
    embeds = base.get_input_embeddings()(batch["input_ids"])
    stacked = torch.stack([p.to(embeds.dtype) for p in prompts])            # (batch, P, d)
    P = stacked.shape[1]
    mask = torch.cat([batch["attention_mask"].new_ones(len(prompts), P), batch["attention_mask"]], dim=1)
    with models.autocast(data_mod.device_of(base)):
        logits = base(inputs_embeds=torch.cat([stacked, embeds], dim=1), attention_mask=mask).logits[:, P:]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, batch["last"]].float()


@torch.no_grad()
def mixed_batch_check(base, tokenizer, tuned_prompts: dict, tasks: dict, per_task: int = 4) -> dict:
    """A batch mixing ``per_task`` test rows of every task, answered in one pass with a different soft prompt
    per row, against each task's prompt model run alone: the largest logit difference and both timings."""
    rows, owners = [], []
    for name, task in tasks.items():
        rows += [task.test[i] for i in range(per_task)]
        owners += [name] * per_task
    # one template for the mixed batch: each row is encoded with its own task's template, then padded together
    encoded = [data_mod.encode([row], tasks[o], tokenizer, device=base) for row, o in zip(rows, owners)]
    width = max(e["input_ids"].shape[1] for e in encoded)
    pad = tokenizer.pad_token_id

    def padded(key, value):
        return torch.cat([torch.nn.functional.pad(e[key], (0, width - e[key].shape[1]), value=value) for e in encoded])
    batch = {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
             "last": torch.cat([e["last"] for e in encoded])}
    started = time.perf_counter()
    mixed = mixed_prompt_label_logits(base, [tuned_prompts[o].prompt for o in owners], batch)
    mixed_s = time.perf_counter() - started
    started = time.perf_counter()
    with models.autocast(data_mod.device_of(base)):  # the precision the mixed pass runs in
        alone = torch.cat([train.label_logits(tuned_prompts[o], e).float() for o, e in zip(owners, encoded)])
    alone_s = time.perf_counter() - started
    # an answer is the row's own task's label word with the highest logit (as accuracy reads it); the argmax over
    # the whole vocabulary would turn on near-ties among unrelated tokens that bf16 rounding can flip
    words = [torch.tensor(data_mod.verbalizer_ids(tasks[o], tokenizer), device=mixed.device) for o in owners]
    answers = lambda logits: [int(w[logits[i, w].argmax()]) for i, w in enumerate(words)]  # noqa: E731
    return {"rows": len(rows), "tasks": len(tasks), "max_abs_diff": float((mixed - alone).abs().max()),
            "same_answers": answers(mixed) == answers(alone), "mixed_s": mixed_s, "one_by_one_s": alone_s}


def storage_table(full_bytes: int, adapter_bytes: dict, base_bytes: int, tasks_at_scale: int = 100) -> list:
    """N tasks as N fine-tuned copies against one base plus N adapters, measured for the tasks trained here
    and scaled to ``tasks_at_scale`` tasks (assuming adapters of the mean measured size)."""
    n = len(adapter_bytes)
    mean_adapter = sum(adapter_bytes.values()) / n
    return [
        {"tasks": n, "N full checkpoints (MiB)": n * full_bytes / 2**20,
         "base + N adapters (MiB)": (base_bytes + sum(adapter_bytes.values())) / 2**20},
        {"tasks": tasks_at_scale, "N full checkpoints (MiB)": tasks_at_scale * full_bytes / 2**20,
         "base + N adapters (MiB)": (base_bytes + tasks_at_scale * mean_adapter) / 2**20},
    ]


# --- time to accuracy ----------------------------------------------------------------------------

def time_to_accuracy(recipe: str, lr: float, base, tokenizer, task, target: float, steps: int, every: int,
                     val_limit: int, seed: int = 0) -> dict:
    """Train ``recipe`` and measure validation accuracy (first ``val_limit`` items) every ``every`` steps.

    Returns the curve [(training seconds so far, accuracy)] and the training seconds at which accuracy first
    reached ``target`` (None if it never did). Training seconds count the steps only, not the measuring.
    Notebook 05 runs it once per seed through ``time_to_accuracy_over_seeds``."""
    torch.manual_seed(seed)
    tuned = study.RECIPES[recipe](base, tokenizer, task.name)
    curve = []

    def measure_now(record):
        if len(record.losses) % every == 0:
            acc = measure.accuracy(tuned, tokenizer, task, "val", limit=val_limit)["accuracy"]
            curve.append((sum(record.step_seconds), acc))
            tuned.train()  # measure.accuracy left it in eval mode

    run = train.fit(tuned, tokenizer, task, steps=steps, lr=lr, seed=seed, tag=f"showdown:time:{recipe}",
                    on_step=measure_now, log=False, progress=False,
                    label=f"{NAMES.get(recipe, recipe)}, lr {runlog.short_number(lr)}")
    reached = next((s for s, acc in curve if acc >= target), None)
    del tuned
    return {"recipe": recipe, "lr": lr, "curve": curve, "seconds_to_target": reached,
            "s_per_step": run.seconds_per_step}


def time_to_accuracy_over_seeds(recipe: str, lr: float, base, tokenizer, task, target: float, steps: int,
                                every: int, val_limit: int, seeds=(0, 1, 2)) -> dict:
    """``time_to_accuracy`` once per seed. Returns the per-seed results (``runs``), how many seeds reached the
    target (``reached``) and the mean training seconds to the target over those seeds with its 95 % interval
    (``seconds``, a ``measure.mean_interval``; None when no seed reached it). Explained in notebook
    05_showdown, section 6."""
    runs = [time_to_accuracy(recipe, lr, base, tokenizer, task, target, steps, every, val_limit, seed=s) for s in seeds]
    times = [r["seconds_to_target"] for r in runs if r["seconds_to_target"] is not None]
    return {"recipe": recipe, "lr": lr, "runs": runs, "reached": len(times), "seeds": len(runs),
            "seconds": measure.mean_interval(times) if times else None}


def time_verdict(a: dict, b: dict) -> str:
    """A sentence, from ``time_to_accuracy_over_seeds`` results, on whether ``a`` reached the target sooner than
    ``b``. The seed means are compared only when every seed of both reached the target: a mean over the seeds
    that happened to get there would flatter a method that often does not."""
    name_a, name_b = NAMES.get(a["recipe"], a["recipe"]), NAMES.get(b["recipe"], b["recipe"])
    if a["reached"] < a["seeds"] or b["reached"] < b["seeds"]:
        return (f"{name_a} reached the target in {a['reached']} of {a['seeds']} seeds, {name_b} in {b['reached']} of "
                f"{b['seeds']}: not every seed got there, so their times are not compared.")
    word = measure.compare(a["seconds"], b["seconds"], "seconds")
    sa, sb = a["seconds"], b["seconds"]
    numbers = (f"{sa['mean']:.0f} s [{max(0, sa['low']):.0f}, {sa['high']:.0f}] against {sb['mean']:.0f} s "
               f"[{max(0, sb['low']):.0f}, {sb['high']:.0f}], means over {a['seeds']} and {b['seeds']} seeds")
    if word == "no measurable difference":
        return f"{name_a} and {name_b} reached the target in times with no measurable difference ({numbers})."
    return f"{name_a} reached the target {'later' if word == 'higher' else 'sooner'} than {name_b} ({numbers})."


def training_minutes(points, rows) -> float:
    """The training minutes a grid of ``study.Point``s would take at the seconds per step measured for each
    recipe in ``rows`` (``study.summarize`` rows with ``s_per_step``; the mean over a recipe's rows): what a
    notebook prints for a grid it skips on a slow machine."""
    speed = {}
    for r in rows:
        if "s_per_step" in r:
            speed.setdefault(r["recipe"], []).append(r["s_per_step"]["mean"])
    missing = sorted({p.recipe for p in points} - set(speed))
    if missing:
        raise ValueError(f"No measured seconds per step for {missing} in these rows; run a grid with them first.")
    return sum(p.steps * sum(speed[p.recipe]) / len(speed[p.recipe]) for p in points) / 60


def train_prompts(base, tokenizer, tasks: dict, num_virtual_tokens: int, steps: int, lr: float, seed: int = 0) -> dict:
    """One soft prompt per task on the same frozen ``base`` (prompt tuning wraps, never copies, the base);
    all of the same length, so that rows of different tasks can share one batch. Returns task -> tuned model."""
    prompts = {}
    for name, task in tasks.items():
        torch.manual_seed(seed)
        tuned = prompt_mod.apply(base, num_virtual_tokens, init="vocab")
        train.fit(tuned, tokenizer, task, steps=steps, lr=lr, seed=seed, tag="showdown:prompt", log=False,
                  label=f"prompt P={num_virtual_tokens} for {name}, lr {runlog.short_number(lr)}")
        prompts[name] = tuned
    return prompts
