"""PEFT's five promises, judged from one notebook's numbers: a verdict and a paragraph per promise, built from the
measurements (never typed), set beside what the literature reports; and the "which method when" advice.

Explained in notebook 05_showdown, sections 9 and 10. Every sentence that says which method did better is printed
from a comparison in ``stats`` (paired item by item where the runs share their test items, else 95 % intervals);
the literature's findings are quoted as findings, with where they were measured, so a learner can see where a
135M model on a small budget agrees with them and where it cannot say.
"""
from __future__ import annotations

from . import stats
from .recipes import NAMES

MIB = 2 ** 20
from .memory import MEMORY_PARTS as STEP_PARTS  # the parts of a step summed for "memory of a step"

LITERATURE = {
    "compute": "Hu et al. (2021) report, for GPT-3 175B with LoRA on q,v: training memory 1.2 TB -> 350 GB and a "
               "checkpoint of 35 MB instead of 350 GB; Dettmers et al. (2023, QLoRA) fine-tune a 65B model on one "
               "48 GB GPU by storing the frozen base in 4 bits.",
    "speed": "Hu et al. (2021) report 25 % faster training per step on GPT-3 175B: no gradients of the frozen "
             "weights are computed or stored. Lester et al. (2021) note that prompt tuning needs more steps to "
             "converge than fine-tuning.",
    "forgetting": "Biderman et al. (2024, \"LoRA Learns Less and Forgets Less\") find that LoRA forgets less of the "
                  "base model's abilities than full fine-tuning, but also learns less of the new domain; compared at "
                  "equal learning the difference shrinks.",
    "many_tasks": "Hu et al. (2021) swap LoRA's A and B per task on one deployed base; Lester et al. (2021) serve "
                  "mixed-task batches through one frozen model with a soft prompt per row; peft routes each row to "
                  "its own LoRA adapter (adapter_names=).",
    "little_data": "Li & Liang (2021) find prefix tuning ahead of full fine-tuning with a few hundred examples on "
                   "table-to-text; Hu et al. (2021) report LoRA ahead of full fine-tuning on GPT-3 with 100 MNLI "
                   "examples; Lester et al. (2021) show prompt tuning trailing fine-tuning on models below about "
                   "10B parameters. No paper settles it for a 135M model.",
    "scale": "Lester et al. (2021): prompt tuning closes its gap to fine-tuning only around 10B parameters (T5); "
             "Liu et al. (2022, P-tuning v2): prompts at every layer (this workbook's prefix) match fine-tuning from "
             "about 330M parameters on NLU tasks.",
}


def step_bytes(memory: dict) -> int:
    """Bytes of one training step, part by part as measured (weights, gradients, optimizer, casts, activations)."""
    return sum(memory.get(p) or 0 for p in STEP_PARTS)


def gap_words(result: dict, what: str = "points") -> str:
    """A paired result (``stats.paired_over_seeds``) as its gap and interval, e.g. "+3.1 points [+0.9, +5.3]"."""
    return f"{100 * result['diff']:+.1f} {what} [{100 * result['low']:+.1f}, {100 * result['high']:+.1f}]"


def separation_note(result: dict) -> str:
    """For a paired comparison with no measurable difference: how many items would separate a gap of this size."""
    if result["p"] < 0.05:  # the items separate them; only the seeds' spread keeps the verdict open
        return (f"the paired test separates them (p = {result['p']:.1g}), but the {result['seeds']} seeds' gaps "
                "spread too widely for the interval to exclude 0: another seed would settle it")
    need = stats.paired_items_needed(result["only_a"], result["only_b"], result["n"])
    if need is None:
        return "the two disagreed on as many items each way, so no test size would separate them"
    return (f"a gap of {abs(100 * result['diff']):.1f} points would need about {need:,} paired test answers "
            f"({need / max(1, result['n'] / result['seeds']):.2g}x this test set's per seed) to show at the 5 % level")


def verdict_line(name_a: str, result: dict, name_b: str) -> str:
    """One method against another, paired over seeds, as a sentence with the gap, its interval and the test."""
    head = (f"{name_a} vs {name_b}: {gap_words(result)} over {result['n']:,} paired answers ({result['seeds']} "
            f"seed(s)); disagreements {result['only_a']} vs {result['only_b']}, exact McNemar p = {result['p']:.2g}: ")
    if result["verdict"] == "no measurable difference":
        return head + f"no measurable difference ({separation_note(result)})."
    return head + f"{name_a} is {result['verdict']}."


def _judge(held: bool, against: bool) -> str:
    return "borne out here" if held and not against else "not borne out here" if against and not held else \
        "mixed here" if held and against else "no measurable difference here"


def _others(methods: dict):
    """(recipe, evidence) of every method but full fine-tuning, the reference each promise is judged against."""
    return [(r, m) for r, m in methods.items() if r != "full"]


def compute_and_storage(methods: dict) -> dict:
    """Promise 1. ``methods``: recipe -> evidence (see ``evidence``); "full" is the reference."""
    full = methods["full"]
    parts, lighter, heavier = [], [], []
    for r, m in _others(methods):
        mem = m["step_bytes"] / full["step_bytes"]
        ckpt = full["checkpoint_bytes"] / max(1, m["checkpoint_bytes"])
        (lighter if mem < 1 else heavier).append(NAMES[r])
        parts.append(f"{NAMES[r]} trains {100 * m['trainable'] / m['total']:.3g} % of the weights, uses "
                     f"{mem:.0%} of full fine-tuning's step memory ({m['step_bytes'] / MIB:.0f} vs "
                     f"{full['step_bytes'] / MIB:.0f} MiB) and writes a checkpoint {ckpt:,.0f}x smaller "
                     f"({m['checkpoint_bytes'] / MIB:.2f} MiB)")
    frozen = max((m for _, m in _others(methods)), key=lambda m: m["step_bytes"])
    why = (f" The memory falls far less than the trainable share: every method still holds the frozen weights "
           f"({frozen['memory']['weights'] / MIB:.0f} MiB here) and the activations of the step "
           f"({(frozen['memory']['activations'] + (frozen['memory'].get('weight_casts') or 0)) / MIB:.0f} MiB), which "
           "full fine-tuning's gradients and optimizer moments (16 bytes a weight in all) dwarf only as models grow.")
    paragraph = "; ".join(parts) + "." + why
    return {"promise": "less compute and storage", "verdict": _judge(bool(lighter), bool(heavier)),
            "paragraph": paragraph, "literature": LITERATURE["compute"],
            "agreement": "The direction agrees with the papers: storage by orders of magnitude, memory by a factor that "
                         "grows with the model (at 135M the frozen weights and activations are most of a step)."}


def training_speed(methods: dict, time_verdicts: list | None = None) -> dict:
    """Promise 2: seconds per step against full fine-tuning (seed means, 95 % intervals), then time to a target
    accuracy where it was measured (``time_verdicts``: sentences of ``showdown.time_verdict``)."""
    full = methods["full"]
    faster, slower, lines = [], [], []
    for r, m in _others(methods):
        word = stats.compare(m["s_per_step"], full["s_per_step"], "seconds")
        (faster if word == "lower" else slower if word == "higher" else []).append(NAMES[r])
        lines.append(f"{NAMES[r]} {m['s_per_step']['mean']:.2f} s/step ({m['s_per_step']['mean'] / full['s_per_step']['mean']:.2f}x "
                     f"full's {full['s_per_step']['mean']:.2f}; {word})")
    paragraph = "Per step, over the grid's seeds: " + "; ".join(lines) + "."
    if time_verdicts:
        paragraph += " To a target accuracy: " + " ".join(time_verdicts)
    return {"promise": "faster training", "verdict": _judge(bool(faster), bool(slower)), "paragraph": paragraph,
            "literature": LITERATURE["speed"],
            "agreement": ("A step is cheaper where the frozen weights' gradients are skipped, as the papers say; "
                          "prefix and prompt tuning add positions to every pass, and a method that needs more steps "
                          "can lose what it saves per step, which only time to accuracy shows.")}


def forgetting(methods: dict, frontier_lines: list | None = None, base_unchanged: bool | None = None) -> dict:
    """Promise 3: KL on prose and fact probes kept, each method at its best learning rate against full
    fine-tuning at its best; then the frontier's comparison at equal learning (``frontier_lines``); then routed
    use (``base_unchanged``: section 5's check that the shared base is bit for bit the same after the swaps)."""
    from .showdown_grid import paired

    full = methods["full"]
    less, more, lines = [], [], []
    for r, m in _others(methods):
        kl = stats.compare(m["kl"], full["kl"], "kl")
        kept = None
        if "kept_greedy" in m and "kept_greedy" in full:  # the same known probes every run: paired where it can be
            result = paired(m["runs"], full["runs"], "kept_greedy") if "runs" in m and "runs" in full else None
            kept = result["verdict"] if result else stats.compare(m["kept_greedy"], full["kept_greedy"], "kept_greedy")
        if kl == "lower" or kept == "higher":
            less.append(NAMES[r])
        if kl == "higher" or kept == "lower":
            more.append(NAMES[r])
        lines.append(f"{NAMES[r]}: KL {m['kl']['mean']:.3f} vs {full['kl']['mean']:.3f} ({kl})"
                     + (f", probes kept {m['kept_greedy']['mean']:.0%} vs {full['kept_greedy']['mean']:.0%} ({kept})" if kept else ""))
    paragraph = ("Each at its best learning rate (chosen on validation), against full fine-tuning: " + "; ".join(lines) + "."
                 + (" At equal learning (the frontier): " + " ".join(frontier_lines) if frontier_lines else "")
                 + ("" if base_unchanged is None else
                    " Measured with the adapter attached, as above, is how a tuned model is used for one task. Routed "
                    "instead (inputs of other tasks sent to the base without the adapter, which prefix, prompt and "
                    "unmerged LoRA allow and full fine-tuning and merged LoRA do not), those inputs see the base "
                    + ("itself, bit for bit unchanged after every adapter swap of section 5: nothing is forgotten "
                       "for them." if base_unchanged else "- but section 5 found the base CHANGED after the swaps.")))
    return {"promise": "less forgetting", "verdict": _judge(bool(less), bool(more)), "paragraph": paragraph,
            "literature": LITERATURE["forgetting"],
            "agreement": "Compare the two halves above: a method that forgets less at its best recipe but not at equal "
                         "learning forgets less because it learned less, which is the paper's finding."}


def many_tasks(swaps: dict, base_unchanged: bool, storage_ratio: float, mixed: dict) -> dict:
    """Promise 4: adapters swapped on one base score the same every round, the base never changes, N tasks cost a
    base and N small files, and soft prompts of different tasks share one batch."""
    identical = all(len(set(s["accuracy"])) == 1 for s in swaps.values())
    held = identical and base_unchanged and storage_ratio > 1 and mixed["same_answers"]
    paragraph = (f"{len(swaps)} LoRA adapters swapped on one loaded base, 3 rounds: accuracies "
                 f"{'identical every round' if identical else 'NOT identical'}; base weights "
                 f"{'unchanged' if base_unchanged else 'CHANGED'}; a swap takes "
                 f"{1000 * max(s['swap_s'] for s in swaps.values()):.0f} ms at most; 100 tasks as full copies need "
                 f"{storage_ratio:.0f}x the disk of one base and 100 adapters; {mixed['rows']} rows of {mixed['tasks']} "
                 f"tasks in one batch behind their own soft prompts gave {'the same' if mixed['same_answers'] else 'DIFFERENT'} "
                 f"answers as each task's model alone.")
    return {"promise": "one base, many tasks", "verdict": "borne out here" if held else "not borne out here",
            "paragraph": paragraph, "literature": LITERATURE["many_tasks"],
            "agreement": "This promise is mechanical, and the measurements bear it out exactly as the papers describe."}


def little_data(comparisons: list, name_a: str, name_b: str) -> dict:
    """Promise 5: ``comparisons`` = [(training examples, paired result of A against B)] from the low-data grid."""
    words = {"higher": [], "lower": [], "no measurable difference": []}
    lines = []
    for n, result in comparisons:
        words[result["verdict"]].append(str(n))
        lines.append(f"{n} examples: {gap_words(result)} ({result['verdict']}"
                     + (f"; {separation_note(result)}" if result["verdict"] == "no measurable difference" else "") + ")")
    verdict = _judge(bool(words["higher"]), bool(words["lower"]))
    paragraph = f"{name_a} minus {name_b}, paired over the seeds on the same test items: " + "; ".join(lines) + "."
    return {"promise": "does well with little labelled data", "verdict": verdict, "paragraph": paragraph,
            "literature": LITERATURE["little_data"],
            "agreement": "The papers' low-data wins were measured on far larger models and other tasks; at 135M the "
                         "numbers above are the evidence: a low-data advantage of the PEFT method is "
                         + {"borne out here": "what they show.", "not borne out here": "not what they show.",
                            "mixed here": "seen at some sizes and reversed at others.",
                            "no measurable difference here": "neither shown nor ruled out."}[verdict]}


def show(results: list) -> None:
    """Print each promise: verdict, the paragraph from the numbers, the literature, and where they agree."""
    for i, r in enumerate(results, 1):
        print(f"{i}. {r['promise'].upper()}: {r['verdict']}")
        for key in ("paragraph", "literature", "agreement"):
            prefix = {"paragraph": "   measured: ", "literature": "   literature: ", "agreement": "   together: "}[key]
            print(prefix + r[key])
        print()


def which_method_when(methods: dict, zero_shot_name: str = "zero-shot") -> list:
    """Advice lines from the measured table: the most accurate method, the methods not measurably below it, and
    among those the cheapest in memory, in storage, and the one that forgot least; then what this model is too
    small to say. ``methods``: recipe -> evidence with ``vs_best`` (paired result against the most accurate)."""
    best = max(methods, key=lambda r: methods[r]["accuracy"]["mean"])
    tied = [r for r in methods if r == best or methods[r]["vs_best"]["verdict"] == "no measurable difference"]
    lines = [f"Most accurate here: {NAMES[best]} ({methods[best]['accuracy']['mean']:.1%}). Not measurably below it "
             f"(paired over seeds): {', '.join(NAMES[r] for r in tied)}."]
    lightest = min(tied, key=lambda r: methods[r]["step_bytes"])
    smallest = min(tied, key=lambda r: methods[r]["checkpoint_bytes"])
    calmest = min(tied, key=lambda r: methods[r]["kl"]["mean"])
    lines.append(f"Among those, the least memory per step: {NAMES[lightest]} ({methods[lightest]['step_bytes'] / MIB:.0f} MiB); "
                 f"the smallest checkpoint: {NAMES[smallest]} ({methods[smallest]['checkpoint_bytes'] / MIB:.2f} MiB); "
                 f"the least drift from the base: {NAMES[calmest]} (KL {methods[calmest]['kl']['mean']:.3f}).")
    behind = [r for r in methods if r not in tied]
    if behind:
        lines.append("Measurably behind the best here: " + "; ".join(
            f"{NAMES[r]} ({gap_words(methods[r]['vs_best'])})" for r in behind) + ".")
    lines.append("Only prefix and prompt tuning put a task in the input, so rows of different tasks share a batch "
                 "without machinery; LoRA needs routing (peft's adapter_names=), full fine-tuning a model per task.")
    lines.append("Where this model is too small to say: " + LITERATURE["scale"])
    return lines


def evidence(recipe: str, runs, row: dict, costs: dict) -> dict:
    """What the promises and the decision table read for one method at its chosen learning rate: the seed means
    of ``row`` (``study.summarize``), the seed runs themselves (for paired comparisons), seconds per step over
    the seeds, the measured step memory and size (seed-independent), and the checkpoint and latency of ``costs``
    (``showdown.recipe_costs``; merged latency for LoRA)."""
    from .showdown_grid import runs_of

    mine = runs_of(runs, recipe, row["lr"], row["task"])
    if not mine:
        raise ValueError(f"No runs of {recipe} at lr {row['lr']} on {row['task']} among these runs.")
    one = next(iter(mine.values()))
    return {**{k: row[k] for k in ("lr", "accuracy", "kl", "kept_greedy", "val_accuracy") if k in row},
            "runs": mine, "s_per_step": stats.mean_interval([r.seconds_per_step for r in mine.values()]),
            "memory": one.memory, "step_bytes": step_bytes(one.memory), "trainable": one.trainable_params,
            "total": one.total_params, "checkpoint_bytes": costs[recipe]["checkpoint_bytes"],
            "latency_s": costs[recipe].get("latency_merged_s", costs[recipe]["latency_s"])}
