"""Gradient checkpointing, measured: activation memory traded for recomputation.

The backward pass needs what the forward pass computed inside every block (the inputs of each matrix product, the
attention weights, the MLP's wide middle). Without checkpointing autograd keeps all of it until the backward pass
reaches that block. With it (``enable(model)``), only each block's input is kept, and the backward pass runs each
block's forward pass again to get the rest: less memory, for about one more forward pass. The arithmetic is the
same; only the order in which some gradients are summed can change, so losses agree to float rounding, not always
bit for bit.

How it is measured: ``train.fit`` counts, on one step, every tensor autograd saves for the backward pass
(``memory.count_saved_activations``; each storage once). Inside a checkpointed block autograd saves nothing (the
checkpoint keeps a placeholder instead). What the checkpoint keeps to run a block again is the block's input: the
hidden states, which it saves through autograd (so fit's count already holds them), and the keyword inputs (the
rotary cos/sin, the attention mask), which transformers binds into the function to run again (held, but invisible
to a count of saved tensors). A hook on every block records both; the keyword inputs are added to fit's count. Tensor by tensor, the same on a CPU and a GPU, where the
process's memory would mix in the allocator's caching. What the count leaves out is the peak of the backward pass,
when one block's insides are computed again and freed before the next block's.

Explained in notebook 07_qlora_and_memory, section 7.
"""
from __future__ import annotations

import gc
import statistics

import torch

from . import data as data_mod
from . import train
from .methods import freeze
from .memory import _storage_key

MIB = 2 ** 20


def enable(model):
    """Gradient checkpointing on every block of a transformers model (``activation_checkpointing_enable`` in
    transformers 5, ``gradient_checkpointing_enable`` before). Non-reentrant: it works with a frozen base whose
    inputs need no gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def prose_task(tokenizer, tokens: int, rows: int) -> data_mod.Task:
    """A text task whose every training text is at least ``tokens`` tokens of the project's prose (the loss is on
    every token, as in pre-training), so each batch is exactly ``tokens`` wide."""
    ids = tokenizer(data_mod.load_prose(), add_special_tokens=False).input_ids
    if len(ids) < tokens + 8:
        raise ValueError(f"The prose has {len(ids)} tokens, too few for texts of {tokens}.")
    step = max(1, (len(ids) - tokens - 8) // max(1, rows - 1))
    texts = [tokenizer.decode(ids[i * step: i * step + tokens + 8]) for i in range(rows)]
    return data_mod.Task(f"prose_{tokens}", [(t, None) for t in texts], [], [], {}, template="{text}")


def _tensors_in(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v)


class _BlockInputs:
    """The tensors handed to the model's blocks, step by step, each storage once: positional arguments (the hidden
    states) and keyword arguments (the rotary cos/sin, the attention mask) apart. A block run again in the backward
    pass gets the same tensors, so it adds nothing."""

    def __init__(self, model):
        self.steps, self.handles = [({}, {})], []
        for block in freeze.blocks(model):
            self.handles.append(block.register_forward_pre_hook(self._record, with_kwargs=True))

    def _record(self, module, args, kwargs):
        for seen, value in zip(self.steps[-1], (args, kwargs)):
            for t in _tensors_in(value):
                if not isinstance(t, torch.nn.Parameter):
                    seen[_storage_key(t)] = t.untyped_storage().nbytes()

    def held_by_checkpoints(self, step: int = -1) -> dict:
        """Bytes a checkpointed block holds for its recomputation: ``saved`` (its positional inputs, which torch's
        checkpoint saves through autograd, so the count of saved tensors has them) and ``closure`` (its keyword
        inputs, which transformers binds into the function the checkpoint calls again: held, but never saved through
        autograd, so no count of saved tensors sees them)."""
        args, kwargs = self.steps[step]
        return {"saved": sum(args.values()), "closure": sum(b for k, b in kwargs.items() if k not in args)}

    def next_step(self, record=None):
        self.steps.append(({}, {}))

    def close(self):
        for h in self.handles:
            h.remove()


def measure(make, base, tokenizer, tokens: int, checkpointing: bool, steps: int = 4, batch_size: int = 4,
            lr: float = 1e-4, seed: int = 0) -> dict:
    """Train ``make(base)`` for ``steps`` steps of ``batch_size`` texts of ``tokens`` tokens, with or without
    gradient checkpointing: the activations a step keeps for its backward pass (MiB), the gradients and optimizer
    state beside them, seconds per step and the losses. The seconds are the median of the steps after the one
    whose saved tensors are counted: the first pays one-off allocations, the counted one the bookkeeping of counting
    (with full fine-tuning under autocast, comparing every saved tensor with the weights)."""
    task = prose_task(tokenizer, tokens, rows=steps * batch_size)
    tuned = make(base)
    if checkpointing:
        enable(tuned)
    inputs = _BlockInputs(tuned)
    try:
        run = train.fit(tuned, tokenizer, task, steps=steps, lr=lr, batch_size=batch_size, max_length=tokens,
                        seed=seed, progress=False, log=False, on_step=inputs.next_step)
    finally:
        inputs.close()
    measured = min(1, steps - 1)  # the step fit counts the saved tensors in
    # what the checkpoints hold of each block: its inputs (without checkpointing the blocks' own operations save
    # them, in fit's count, not reported apart); only the keyword inputs are missing from fit's count
    held = inputs.held_by_checkpoints(measured) if checkpointing else {"saved": 0, "closure": 0}
    del tuned
    gc.collect()
    return {"checkpointing": checkpointing, "tokens": tokens, "batch": batch_size,
            "activations MiB": (run.memory["activations"] + held["closure"]) / MIB,
            "of which block inputs MiB": (held["saved"] + held["closure"]) / MIB,
            "gradients+optimizer MiB": (run.memory["gradients"] + run.memory["optimizer"]) / MIB,
            "s/step": statistics.median(run.step_seconds[measured + 1:] or run.step_seconds), "losses": run.losses}
