"""One training loop for every method, and the run log.

Explained in notebook 01_full_finetuning_and_freezing, section "The training loop".

``fit`` never asks which method it trains: it optimises whatever parameters of ``tuned`` have
``requires_grad`` (all of them for full fine-tuning; A and B for LoRA; the prefix or the soft prompt)
with AdamW, on the cross-entropy of the verbalizer token after each prompt. Along the way it
measures what a step costs, *in a real step*:

* weights, gradients and optimizer state: exact bytes, read off the tensors themselves;
* activations: the bytes autograd keeps for the backward pass, counted with saved-tensor hooks;
* the process peak: CUDA's peak allocator figure on a GPU, the resident set size on a CPU;
* seconds per step and tokens per second, after a warm-up step.

Every run is appended to the run log (``runlog``: a JSON-lines file) so later notebooks can compare
methods without training again.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import models, nf4
from .memory import (HALF, MEMORY_PARTS, PeakMemory, count_saved_activations, numbers_by_dtype,  # noqa: F401
                     optimizer_state_bytes, tensor_bytes)  # memory lives in memory.py; these names stay here too
from .runlog import RunRecord, latest_run, load_runs, run_log_path, save_run  # noqa: F401  (the run log lives in runlog)


def trainable_parameters(tuned) -> list:
    """The parameters the optimizer updates: those with ``requires_grad``, each shared tensor once."""
    return list({id(p): p for p in tuned.parameters() if p.requires_grad}.values())


def label_logits(tuned, batch: dict) -> torch.Tensor:
    """Next-token logits at the last real token of each row (right padding), shape (batch, vocab).

    The vocabulary head (576 -> 49,152 numbers a position on SmolLM2) runs only at the positions read:
    ``logits_to_keep`` takes the distinct last positions of the batch (at most one per row), not all
    batch x tokens. The full-width logits, and their gradient in training, were the largest activation of a
    LoRA step, and computing them took about a seventh of its time (``benchmarks/measured_run.py``).
    """
    last = batch["last"]
    keep = torch.unique(last)  # sorted; a row reads the kept position equal to its own last token
    logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, torch.searchsorted(keep, last)]


def text_loss(tuned, batch: dict) -> torch.Tensor:
    """Cross-entropy of every scored next token (``labels`` not -100): every token of a text (new knowledge), or a
    chat conversation's answer (``chat.encode`` blanks out the prompt).

    The logits at position t score the label at t + 1. The vocabulary head runs only at positions whose next token
    some row scores: for a conversation, the answer's stretch of the batch, not its prompt (the system prompt and
    the question), so the batch x tokens x 49,152 logits and their gradient shrink with it (notebook
    08_chat_tuning, section 3). A text scored everywhere gets every position, as before.
    """
    labels = batch["labels"]
    scored = (labels[:, 1:] != -100).any(dim=0).nonzero().squeeze(1)  # positions t whose label at t + 1 counts
    if len(scored) == labels.shape[1] - 1:  # every position: the plain full-width head
        logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    else:
        logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=scored).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, scored + 1].reshape(-1),
                           ignore_index=-100)


def loss_on(tuned, batch: dict) -> torch.Tensor:
    """Cross-entropy of the verbalizer token: the one objective every method trains."""
    return F.cross_entropy(label_logits(tuned, batch).float(), batch["target"])


# --- the loop -----------------------------------------------------------------------------------

def fit(tuned, tokenizer, task, steps: int = 60, lr: float = 5e-4, batch_size: int = 8, max_length: int = 64,
        seed: int = 0, weight_decay: float = 0.0, tag: str | None = None, on_step=None,
        progress: bool = True, log: bool = True, warmup_steps: int = 0, label: str = "",
        lr_scale: dict | None = None) -> RunRecord:
    """Train ``tuned`` on ``task.train`` for ``steps`` steps; return a ``RunRecord``.

    Explained in notebook 01, "The training loop". ``on_step(record)`` is called after every step
    (the widgets use it to redraw the loss curve live). With ``log`` the run is appended to the run
    log. Seeded: the same call gives the same losses on the same machine (the method's own random
    start comes from the global generator: seed it before ``apply``). The record's method is read from the
    model; ``tag`` names what the run is for lookups (default: the method word), ``label`` for tables.

    ``lr_scale`` gives some parameters a multiple of ``lr``, by a piece of their name: LoRA+ is
    ``lr_scale={"lora_B": 16}`` (B learns 16 times faster than A). Explained in notebook 06_beyond_lora, section 4.
    """
    params = _checked_parameters(tuned, steps)
    device = next(tuned.parameters()).device
    dtype = models.compute_dtype(device)
    unique = list({id(p): p for p in tuned.parameters()}.values())
    record = _new_record(tuned, task, params, unique, device, tag, label, steps=steps, lr=lr, batch_size=batch_size,
                         max_length=max_length, seed=seed, lr_scale=lr_scale, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
    torch.manual_seed(seed)
    # fused AdamW: one kernel for all parameters instead of several per tensor (GPU only)
    optimizer = torch.optim.AdamW(_param_groups(tuned, params, lr, lr_scale), lr=lr, weight_decay=weight_decay,
                                  fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))  # fp16 only: bf16 and fp32 need no scaling
    label_words = None if task.is_text else torch.tensor(data_mod.verbalizer_ids(task, tokenizer), device=device)
    stream = data_mod.endless_batches(task.train, task, tokenizer, batch_size, max_length, seed)
    measure_at = min(1, steps - 1)  # the memory breakdown is taken in the first step after warm-up
    tuned.train()
    bar = _progress(steps, progress, record.label)
    try:
        with PeakMemory(device) as peak:
            for step in range(steps):
                batch = data_mod.to_device(next(stream), device)
                started = time.perf_counter()
                counting = count_saved_activations(unique, dtype) if step == measure_at else contextlib.nullcontext({})
                with counting as saved:
                    loss = _forward_and_backward(tuned, task, batch, label_words, scaler, record, step, lr, dtype)
                if step == measure_at:  # gradients exist now, before the optimizer step frees them
                    record.memory = _memory_snapshot(tuned, unique, params, saved, batch)
                _update(optimizer, scaler, schedule, record)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                record.step_seconds.append(time.perf_counter() - started)
                record.tokens_per_step.append(int(batch["attention_mask"].sum()))
                record.losses.append(loss.item())
                # AdamW creates its state on its first real step; under fp16 loss scaling the first
                # steps may be skipped (inf gradients), so the state is read once it exists.
                if record.memory and record.memory["optimizer"] is None and len(optimizer.state) == len(params):
                    record.memory["optimizer"] = optimizer_state_bytes(optimizer)
                bar.update(1)
                bar.set_postfix(loss=f"{record.losses[-1]:.3f}")
                if on_step is not None:
                    on_step(record)
    except KeyboardInterrupt:
        # Interrupting (Kernel > Interrupt) keeps what was learned: the tuned model is usable, the
        # base untouched; the partial run is returned but not logged, so it never stands in for a full one.
        record.config["interrupted_after_steps"] = len(record.losses)
        log = False
        print(f"Stopped after {len(record.losses)} of {steps} steps; the model keeps what it learned so far "
              "(this partial run is not written to the run log).")
    finally:
        bar.close(record, steps)
        tuned.eval()
    if not record.memory:
        return record  # interrupted before the memory was measured
    _finish_memory(record, optimizer, peak, device)
    if log:
        save_run(record)
    return record


def _update(optimizer, scaler, schedule, record) -> None:
    """The optimizer step (through the loss scaler, which only fp16 enables), the warm-up, gradients dropped."""
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    if scaler.get_scale() < scale:  # fp16: an inf/nan gradient, the step skipped and the scale halved
        record.config["skipped_steps"] = record.config.get("skipped_steps", 0) + 1
    else:  # the warm-up counts the steps that really updated the weights
        schedule.step()
    optimizer.zero_grad(set_to_none=True)


def _finish_memory(record, optimizer, peak, device) -> None:
    """The parts a run knows only at its end: the optimizer's state (if no step read it) and the process peak."""
    if record.memory.get("optimizer") is None:
        record.memory["optimizer"] = optimizer_state_bytes(optimizer)  # 0 if every step was skipped
    record.memory["process_peak"] = peak.peak
    record.memory["peak_kind"] = "cuda max allocated" if device.type == "cuda" else "resident set size"


def _checked_parameters(tuned, steps: int) -> list:
    """The parameters ``fit`` trains, refused with a clear message when there are none, or when they are half."""
    params = trainable_parameters(tuned)
    if not params:
        raise ValueError("Nothing to train: no parameter has requires_grad. Apply a method or a freezing choice first.")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    half = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if half:
        raise ValueError(f"The trainable parameters are {', '.join(half)}: train fp32 master weights. For full "
                         "fine-tuning or a freezing choice use models.fresh_copy(base), which copies in fp32.")
    return params


def _new_record(tuned, task, params, unique, device, tag, label, **settings) -> RunRecord:
    """The run's record before its first step: settings, the method's own settings, sizes, model and mode."""
    info = getattr(tuned, "peft_lab_info", None) or getattr(getattr(tuned, "base_model", None), "peft_lab_info", {}) or {}
    lr_scale = settings.pop("lr_scale")
    config = {k: settings[k] for k in ("steps", "lr", "batch_size", "max_length", "seed")}
    config.update({**({"lr_scale": lr_scale} if lr_scale else {}), "weight_decay": settings["weight_decay"],
                   "warmup_steps": settings["warmup_steps"], **{k: v for k, v in info.items() if k != "method"}})
    return RunRecord(method=info.get("method", "custom"), tag=tag or "", task=task.name, config=config,
                     trainable_params=sum(p.numel() for p in params),
                     total_params=sum(p.numel() for p in unique) + sum(nf4.storage_numbers(tuned).values()),
                     model=_model_name(tuned), label=label, device=str(device), quick=data_mod.quick_mode())


def _forward_and_backward(tuned, task, batch, label_words, scaler, record, step: int, lr: float, dtype):
    """One step's loss, under autocast, and its backward pass (scaled under fp16); the label-word loss is logged."""
    with models.autocast(data_mod.device_of(tuned)):
        if task.is_text:
            loss = text_loss(tuned, batch)
        else:
            logits = label_logits(tuned, batch).float()
            loss = F.cross_entropy(logits, batch["target"])  # loss_on, keeping the logits
    if not task.is_text:
        with torch.no_grad():  # the same logits judged over the label words alone: what accuracy sees
            record.label_losses.append(F.cross_entropy(logits[:, label_words], batch["label"]).item())
    if not torch.isfinite(loss):
        raise FloatingPointError(_non_finite_message(loss, step, lr, dtype))
    scaler.scale(loss).backward()
    return loss


def _memory_snapshot(model, unique, params, saved: dict, batch) -> dict:
    """What the measured step holds, part by part (``memory.MEMORY_PARTS``); the optimizer's state is read once
    AdamW has made it (after its first real step). A base stored in 4 bits keeps its weights as codes and scales
    (buffers, not parameters): they count as weights too."""
    return {"weights": tensor_bytes(unique) + nf4.storage_bytes_4bit(model),
            "weight_dtypes": {**numbers_by_dtype(unique), **nf4.storage_numbers(model)},
            "gradients": tensor_bytes(p.grad for p in params if p.grad is not None), "optimizer": None,
            "weight_casts": saved["weight_cast_bytes"], "activations": saved["bytes"],
            "batch": [int(x) for x in batch["input_ids"].shape]}


def _param_groups(tuned, params, lr: float, lr_scale: dict | None) -> list:
    """AdamW parameter groups: one at ``lr``, plus one per ``lr_scale`` entry at ``lr * factor``."""
    if not lr_scale:
        return [{"params": params}]
    names = {id(p): n for n, p in tuned.named_parameters()}
    groups = {1.0: []}
    for p in params:
        factor = next((f for key, f in lr_scale.items() if key in names.get(id(p), "")), 1.0)
        groups.setdefault(float(factor), []).append(p)
    unused = [key for key in lr_scale if not any(key in names.get(id(p), "") for p in params)]
    if unused:
        raise ValueError(f"lr_scale names {unused}, which no trainable parameter's name contains.")
    return [{"params": ps, "lr": lr * f} for f, ps in groups.items() if ps]


def _non_finite_message(loss, step: int, lr: float, dtype) -> str:
    cause = (f"the learning rate ({lr:g}) is probably too high: try one ten times smaller"
             if dtype != torch.float16 else
             "fp16 probably overflowed: run in bf16 or fp32 (PEFT_LAB_PRECISION=fp32), or lower the learning rate")
    return f"The loss became {loss.item()} at step {step + 1}; {cause}. The tuned model may hold non-finite numbers now: start again from a fresh copy."


def _model_name(tuned) -> str:
    """The loaded model's name, whether ``tuned`` is the model itself or a prefix/prompt wrapper around it."""
    for candidate in (tuned, getattr(tuned, "model", None), getattr(tuned, "base_model", None)):
        name = getattr(candidate, "peft_lab_name", "")
        if name:
            return name
    return ""


def _progress(steps, enabled, label):
    """A live bar while training that leaves one line saying what ran once it is done.

    The bar is erased at the end (``leave=False``): a saved notebook would otherwise show it frozen at
    "0%| 0/60" wherever the page is read without running it (GitHub's static view). The line left in its
    place, e.g. "training lora: 60 steps, 1.30 s/step, loss 4.91 → 0.21", reads the same everywhere.
    """
    from tqdm.auto import tqdm

    return _Progress(tqdm(total=steps, desc=f"training {label}", disable=not enabled, leave=False), enabled, label)


class _Progress:
    """tqdm's ``update`` and ``set_postfix``; ``close(record, steps)`` also prints the summary line."""

    def __init__(self, bar, enabled: bool, label: str):
        self.bar, self.enabled, self.label = bar, enabled, label

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def close(self, record, steps: int) -> None:
        self.bar.close()
        if self.enabled:
            print(_summary_line(self.label, record, steps))


def _summary_line(label: str, record, steps: int) -> str:
    """What one training run did, in one line: steps, seconds per step, first and last loss."""
    done = len(record.losses)
    if done == 0:
        return f"training {label}: stopped before the first of {steps} steps"
    ran = f"{done} steps" if done == steps else f"stopped after {done} of {steps} steps"
    first, last, k = record.loss_start_end()
    return (f"training {label}: {ran}, {record.seconds_per_step:.2f} s/step, loss {first:.2f} → {last:.2f}"
            + (f" (means of the first and last {k} steps)" if k > 1 else ""))
