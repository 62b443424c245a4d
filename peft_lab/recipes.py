"""Named recipes: how each way of fine-tuning that the workbook compares is built from the frozen base, and what a
learner calls it. One table for the study grids (notebook 05's shipped grid), the baselines that notebooks compare
against (``baselines``) and the names in tables and figures.

Every recipe returns a model to train and never changes the base: a fresh fp32 copy for full fine-tuning and the
freezing choices, a frozen copy for the layer methods and prefix tuning, a wrapper for prompt tuning. The panels
(``widgets.PANELS``) and the planner's measuring harness build their models from their own controls and settings;
these are the fixed recipes.
"""
from __future__ import annotations

from . import models
from .methods import freeze, lora, prefix, prompt

# Instructions for the text starts of prefix and prompt tuning, per task (a text fits whole: P = its length)
INSTRUCTIONS = {
    "reviews": "Decide whether the following customer review is positive or negative.",
    "review_domain": "Decide whether the following review is about a film, product, restaurant, app, book or travel.",
    "chat_records": "Answer with the harbour-log entry as one line of JSON with the fields person, vessel, place, day, "
                    "month, cargo and count.",
}


def _virtual_tokens(apply, base, tok, task_name, **settings):
    """A prefix or prompt that starts from the task's instruction (one slot per token), or from random
    vocabulary words / random values for a task without one."""
    text = INSTRUCTIONS.get(task_name.split(",")[0]) if task_name else None
    if text is None:
        return apply(base, 16, **settings)
    return apply(base, len(tok(text, add_special_tokens=False).input_ids), init="text", init_text=text,
                 tokenizer=tok, **settings)


def full(base, tok=None, task_name=None):
    """Full fine-tuning: every weight of an fp32 copy trains."""
    return freeze.apply(models.fresh_copy(base), "full", verbose=False)


def last_2_blocks(base, tok=None, task_name=None):
    """The last two transformer blocks (and the final norm) of an fp32 copy train."""
    return freeze.apply(models.fresh_copy(base), "last_n", n=2, verbose=False)


def lora_qv(base, tok=None, task_name=None):
    """LoRA r = 8, alpha = 16 on the attention's query and value projections (the original paper's choice)."""
    return lora.apply(models.frozen_copy(base), rank=8, alpha=16, targets=["q_proj", "v_proj"])


def lora_all(base, tok=None, task_name=None):
    """LoRA r = 8, alpha = 16 on every linear layer but the output head (QLoRA's and Biderman et al.'s choice)."""
    return lora.apply(models.frozen_copy(base), rank=8, alpha=16, targets="all-linear")


def prefix_for_task(base, tok, task_name):
    """Prefix tuning from the task's instruction (``INSTRUCTIONS``), one slot per token."""
    return _virtual_tokens(prefix.apply, models.frozen_copy(base), tok, task_name)


def prompt_for_task(base, tok, task_name):
    """Prompt tuning from the task's instruction: a wrapper, so the base itself is used, never changed."""
    return _virtual_tokens(prompt.apply, base, tok, task_name)


# recipe -> how to build the model it trains, called as BUILD[recipe](base, tokenizer, task_name)
BUILD = {"full": full, "last-2-blocks": last_2_blocks, "lora-qv": lora_qv, "lora-all": lora_all,
         "prefix": prefix_for_task, "prompt": prompt_for_task}

# the method word each recipe's model carries (``peft_lab_info["method"]``), which its runs log as their method
METHODS = {"full": "full", "last-2-blocks": "freeze:last_n", "lora-qv": "lora", "lora-all": "lora",
           "prefix": "prefix", "prompt": "prompt"}

# what a learner calls each recipe in tables and figures
NAMES = {"full": "full fine-tuning", "last-2-blocks": "last 2 blocks", "lora-qv": "LoRA r=8 (q,v)",
         "lora-all": "LoRA r=8 (all linear)", "prefix": "prefix", "prompt": "prompt"}
