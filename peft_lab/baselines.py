"""The runs a notebook compares against: from the run log, or trained on the spot when a notebook is
opened alone (say, straight from GitHub in Colab), so a comparison is never empty.

Explained in notebook 02_lora, section 5. Each baseline is a recipe with fixed settings; a logged run
counts only if its tag, task, learning rate and number of steps all match (runs are looked up by
what they are, not by a method word alone).
"""
from __future__ import annotations

from . import measure, models, recipes, runlog, train
from .methods import prefix

PREFIX_INIT_TEXT = ("The following are customer reviews. After each review, its sentiment is given as "
                    "positive or negative.")


def _prefix(base, tok):
    length = len(tok(PREFIX_INIT_TEXT).input_ids)  # one slot per token of the init text (notebook 03)
    return prefix.apply(models.frozen_copy(base), length, init="text", init_text=PREFIX_INIT_TEXT, tokenizer=tok)


# name -> (the tag in the run log: the method word notebooks 01-03 train these runs under, learning rate, how to build the tuned model): notebooks 01-03's recipes
# (full fine-tuning and LoRA q,v are the shared recipes of recipes.py; the prefix starts from notebook 03's text).
# The two full fine-tuning recipes share the tag and differ in the learning rate the lookup asks for.
RECIPES = {
    "full": ("full", 2e-5, recipes.full),
    "full, lr 1e-4": ("full", 1e-4, recipes.full),
    "lora": ("lora", 2e-4, recipes.lora_qv),
    "prefix": ("prefix", 1e-3, _prefix),
}


def get(name: str, base, tok, task, steps: int, base_scores=None):
    """The newest evaluated run of recipe ``name`` at ``steps`` steps on ``task`` (this mode), from the run
    log; if there is none, it is trained and measured now (and logged for the next notebook)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown baseline {name!r}; known: {', '.join(RECIPES)}.")
    tag, lr, build = RECIPES[name]
    run = runlog.latest_run(tag, task.name, lr=lr, steps=steps, model=getattr(base, "peft_lab_name", None))
    if run is not None and "kl_low" in run.metrics:  # measured with intervals (older runs are measured again)
        return run
    print(f"No {name!r} run (lr {lr:g}, {steps} steps) in the run log: training it now, as its notebook would ...")
    tuned = build(base, tok)
    run = train.fit(tuned, tok, task, steps=steps, lr=lr, tag=tag)
    measure.evaluate_run(run, base, tuned, tok, task, base_scores=base_scores)
    return run
