"""The memory planner: will this model train on that GPU, with which method?

From a model's *architecture numbers alone* (``data/model_configs/<name>.json``: hidden size, MLP
size, layers, query and key/value heads, vocabulary, tied embeddings; no weights) it predicts the
bytes one training step holds, split like ``train.fit`` measures them:

* weights: the frozen base in fp32 (4 B a number), bf16 (2 B) or 4-bit NF4 as in QLoRA (the decoder's
  linear layers at ``memory.BYTES["4-bit"]``, about 0.516 B a number with double quantisation; embeddings and norms in bf16),
  plus the trained numbers in fp32. Full fine-tuning keeps every weight as an fp32 master copy.
* gradients: 4 B per trained number; optimizer: AdamW's two fp32 moments, 8 B per trained number.
* weight casts: under half-precision autocast, the half copies of fp32 weights a step saves.
* activations: what autograd keeps for the backward pass, derived layer by layer (``activation_bytes``).

The formulas live with the rest of memory in ``memory.py`` (``memory.predict``; the planner re-exports their
names); here are the answers in words, the T4 and sharding advice, and the harness that checks them.

Explained in notebook 05_showdown, section 7; checked against measured steps with a 4-bit base and gradient
checkpointing, and used for bigger models and sharding, in 07_qlora_and_memory, section 10.

``check_against_measurement`` runs real steps with ``train.fit`` and sets each prediction beside the
measurement. Its interactive face is ``widgets.planner_panel()`` (figure: ``plots.planner_bars``), with the
free Colab T4's 14.75 GiB drawn in.

    cfg = planner.load_config("qwen2.5-1.5b")
    planner.predict(cfg, "lora", base_precision="4-bit", batch=8, seq_len=512)["total"] / 2**30
"""
from __future__ import annotations

import contextlib
import os
import time

from . import data as data_mod
from . import memory
# the formulas live with the rest of memory (memory.py); the planner asks them and answers in words
from .memory import (METHODS, PRECISIONS, REQUIRED, activation_bytes, configs, dims, load_config,  # noqa: F401 (re-exported)
                     parameter_count, parameter_groups, predict, recompute_bytes, resolve_config, trainable_count)
from .memory import MEMORY_PARTS as PARTS
GiB = 2 ** 30
# A free Colab T4 as PyTorch sees it: 14.75 GiB. The card is sold as "16 GB" and nvidia-smi shows 15,360 MiB, but
# the memory CUDA reports to programs (cudaDeviceProp.totalGlobalMem, i.e. torch.cuda.get_device_properties(0)
# .total_memory) is 14.75 GiB: TensorFlow's device log prints "Tesla T4 computeCapability: 7.5 ... deviceMemorySize:
# 14.75GiB" (NVIDIA/DALI#1813). A T4 computes in fp16, the same 2 bytes a number as bf16.
T4_BYTES = int(14.75 * GiB)
# The CUDA context (the driver and the kernels loaded so far) takes device memory before PyTorch allocates anything,
# outside what its allocator counts: about 300 MiB since CUDA 11.7 loads kernels lazily, over 1 GB before
# (pytorch/pytorch#107667). An assumption, not measured here (no GPU): torch.cuda.mem_get_info() after the first
# CUDA call shows yours. The allocator's caching and fragmentation take more on top, so a plan near the limit is tight.
CUDA_CONTEXT_BYTES = 300 * 2 ** 20
# How a run too big for one GPU is shared out: each GPU holds a 1/N slice of the weights, gradients and optimizer
# state and gathers one block in full while it runs it (PyTorch FSDP's full sharding, DeepSpeed ZeRO-3).
SHARDING_HOWTO = ("FSDP or DeepSpeed ZeRO-3 through accelerate: `accelerate config` (choose FSDP, FULL_SHARD, or "
                  "DeepSpeed stage 3), then `accelerate launch --num_processes N train.py`; see accelerate's FSDP and "
                  "DeepSpeed guides")


# --- does it fit? -------------------------------------------------------------------------------

def _label(method: str, precision: str) -> str:
    return f"{method} ({'fp32 masters, ' + precision + ' compute' if method == 'full' else precision + ' base'})"


def options(cfg, batch: int, seq_len: int, **settings) -> list:
    """(label, total bytes) for every method and base precision that makes sense, smallest first."""
    rows = [(_label(m, p), predict(cfg, m, p, batch, seq_len, **settings)["total"])
            for m in METHODS for p in PRECISIONS if not (m == "full" and p == "4-bit")]
    return sorted(rows, key=lambda r: r[1])


def largest_batch(cfg, method: str, base_precision: str, seq_len: int, limit: int = T4_BYTES, **settings) -> int:
    """The largest batch (0 if none) whose predicted step fits in ``limit`` bytes."""
    batch = 0
    while batch < 4096 and predict(cfg, method, base_precision, batch + 1, seq_len, **settings)["total"] <= limit:
        batch += 1
    return batch


def gib(n_bytes: float) -> str:
    """GiB as a short number: 14.75, 9.4, 45.3 (two decimals only where the second one is not zero)."""
    text = f"{n_bytes / GiB:.2f}"
    return text[:-1] if text.endswith("0") else text


def base_precision(device) -> str:
    """The planner's base precision for what ``models.compute_dtype`` picks on ``device``: "fp32", or "bf16" for
    either half precision (a T4's fp16 base takes the same 2 bytes a number as bf16)."""
    import torch

    from . import models

    return "fp32" if models.compute_dtype(device) == torch.float32 else "bf16"


def sharded(cfg, method: str, base_precision: str, gpus: int, batch: int = 8, seq_len: int = 512, **settings) -> dict:
    """Bytes on each of ``gpus`` GPUs training one model together with full sharding (FSDP, ZeRO-3): a 1/N slice of
    the weights, gradients and optimizer state; two blocks' weights gathered in full (the one running and the next,
    fetched ahead); and the activations of the ``batch`` rows each GPU runs. Arithmetic only: launching it is
    accelerate's job (``SHARDING_HOWTO``)."""
    if int(gpus) < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}.")
    parts = predict(cfg, method, base_precision, batch, seq_len, **settings)
    d = dims(cfg)
    per_block = (parameter_groups(cfg)["linear"] + parameter_groups(cfg)["other"]) / d["L"]
    # gathered in the compute precision (FSDP's mixed precision gathers fp32 masters as bf16), or as stored when 4-bit
    stored = 4 if base_precision == "fp32" else memory.BYTES["4-bit"] if base_precision == "4-bit" else 2
    static = (parts["weights"] + parts["gradients"] + parts["optimizer"]) / gpus
    gathered = 2 * per_block * stored if gpus > 1 else 0
    # the gathered blocks arrive in the compute precision, so autocast's saved casts of whole weights give way to them
    running = parts["activations"] + parts["recompute"] + (parts["weight_casts"] if gpus == 1 else 0)
    return {"gpus": gpus, "sharded state": static, "gathered blocks": gathered, "activations and casts": running,
            "per_gpu": static + gathered + running}


def answer(cfg, method: str, base_precision: str, batch: int, seq_len: int, limit: int = T4_BYTES, **settings) -> str:
    """One sentence: does this fit on a free T4 (14.75 GiB as PyTorch sees it, less the CUDA context), and if not,
    what would: another method, a smaller batch, and, where no single card holds even LoRA over a 4-bit base with
    gradient checkpointing, the per-GPU arithmetic of sharding the run over several."""
    usable = limit - CUDA_CONTEXT_BYTES
    total = predict(cfg, method, base_precision, batch, seq_len, **settings)["total"]
    name = _label(method, base_precision)
    levers = ("with gradient checkpointing" if settings.get("checkpointing") else "no checkpointing") + \
        (", whole-text loss" if settings.get("loss") == "text" else "")
    if total <= usable:
        return (f"{name} fits on a free T4: {total / GiB:.1f} GiB of the {gib(usable)} GiB left beside the CUDA context, "
                f"at batch {batch} x {seq_len} tokens ({levers}).")
    fitting = [(label, t) for label, t in options(cfg, batch, seq_len, **settings) if t <= usable]
    tip = (f"At batch {batch} x {seq_len}, what fits: " + "; ".join(f"{l} {t / GiB:.1f} GiB" for l, t in fitting[:4])
           if fitting else f"At batch {batch} x {seq_len} no method fits")
    smaller = largest_batch(cfg, method, base_precision, seq_len, usable, **settings)
    keep = (f"Keeping {name}, batch {smaller} fits." if smaller else
            f"{name} does not fit even at batch 1 at this length.")
    text = (f"{name} does not fit on a free T4 ({levers}): {total / GiB:.1f} GiB > the {gib(usable)} GiB left beside "
            f"the CUDA context. {tip}. {keep}")
    lean = predict(cfg, "lora", "4-bit", 1, seq_len, **{**settings, "checkpointing": True})["total"]
    if lean > usable:
        text += (f" No single T4 holds this model: even LoRA over a 4-bit base with checkpointing at batch 1 needs "
                 f"{lean / GiB:.1f} GiB.")
    if not smaller:  # the method asked for fits no single card: how many would share it (each GPU runs its own rows)
        found = next(((n, b) for b in dict.fromkeys((batch, 1)) for n in (2, 4, 8, 16, 32, 64)
                      if sharded(cfg, method, base_precision, n, b, seq_len, **settings)["per_gpu"] <= usable), None)
        if found:
            n, b = found
            need = sharded(cfg, method, base_precision, n, b, seq_len, **settings)["per_gpu"]
            text += (f" Sharded over {n} T4s, {b} row(s) of {seq_len} tokens a GPU, {name} needs {need / GiB:.1f} GiB "
                     f"on each ({SHARDING_HOWTO}).")
        else:
            text += " Even sharded over 64 T4s at one row a GPU it would not fit: shorten the texts or checkpoint."
    return text


# --- against a real step ------------------------------------------------------------------------

def hf_config(cfg):
    """A transformers config built from the planner's numbers (for a random-weight model of that shape)."""
    from transformers import AutoConfig

    cfg = resolve_config(cfg)
    fields = {k: cfg[k] for k in REQUIRED if k != "model_type"}
    return AutoConfig.for_model(cfg["model_type"], **fields, **({"head_dim": cfg["head_dim"]} if "head_dim" in cfg else {}))


def build_model(cfg):
    """A causal LM of ``cfg``'s shape with random weights, fp32, frozen, in eval mode (no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


@contextlib.contextmanager
def _compute_precision(precision: str):
    """Run the block with ``PEFT_LAB_PRECISION`` set, so ``train.fit`` computes in that precision."""
    old = os.environ.get("PEFT_LAB_PRECISION")
    os.environ["PEFT_LAB_PRECISION"] = precision
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PEFT_LAB_PRECISION", None)
        else:
            os.environ["PEFT_LAB_PRECISION"] = old


def _tuned(base, method: str, precision: str, rank: int, targets, virtual_tokens: int):
    """A trainable copy of ``base`` for ``method``: a frozen base in ``precision``, trained numbers in fp32."""
    import torch

    from . import models
    from .methods import lora, prefix, prompt

    if method == "full":
        return models.fresh_copy(base)
    frozen = models.frozen_copy(base).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    if method == "lora":
        return lora.apply(frozen, rank=rank, targets=targets)
    module = prefix if method == "prefix" else prompt
    return module.apply(frozen, num_virtual_tokens=virtual_tokens)


def measure_step(base, tokenizer, task, method: str, precision: str = "fp32", batch: int = 8, seq_len: int = 64,
                 rank: int = 8, targets=("q_proj", "v_proj"), virtual_tokens: int = 20, steps: int = 2):
    """``train.fit`` for a couple of steps on a fresh copy; its ``RunRecord`` (``memory`` holds the bytes)."""
    from . import train

    with _compute_precision(precision):
        tuned = _tuned(base, method, precision, rank, targets, virtual_tokens)
        return train.fit(tuned, tokenizer, task, steps=steps, lr=1e-5, batch_size=batch, max_length=seq_len,
                         progress=False, log=False, tag=f"planner:{method}")


def compare_rows(cfg, model_name: str, record, method: str, precision: str, **settings) -> list:
    """Predicted beside measured, one row per part and one for the total (bytes in MiB, error in %)."""
    batch, seq_len = record.memory["batch"]  # the step's real shape: rows are padded to the longest text
    pred = predict(cfg, method, precision, batch, seq_len, **settings)  # fit trains the label loss on "reviews"
    got = {p: record.memory.get(p) or 0 for p in PARTS}
    got["total"] = sum(got.values())
    rows = []
    for part in (*PARTS, "total"):
        error = 100 * (pred[part] - got[part]) / got[part] if got[part] else (0.0 if not pred[part] else float("inf"))
        rows.append({"model": model_name, "method": method, "precision": precision, "batch": f"{batch}x{seq_len}",
                     "part": part, "predicted MiB": pred[part] / 2 ** 20, "measured MiB": got[part] / 2 ** 20,
                     "error %": error})
    return rows


def check_against_measurement(quick: bool = False, methods=None, precisions=None, models_to_run=None,
                              batch: int = 8, seq_len: int = 64, rank: int = 8, targets=("q_proj", "v_proj"),
                              virtual_tokens: int = 20, steps: int = 2) -> list:
    """Predicted vs measured memory on the models that run here; rows as in ``compare_rows``.

    Models: the embedded SmolLM2-135M (real weights) and a random-weight SmolLM2-360M built from its
    config (the bytes do not depend on the values). ``quick=True``: the 135M model in fp32 with LoRA and
    prompt tuning only, for a notebook cell under CI. bf16 runs use ``PEFT_LAB_PRECISION=bf16`` (slow
    where the CPU has no bf16 arithmetic, but the bytes are the same as on a GPU).
    """
    from . import models

    methods = list(methods or (("lora", "prompt") if quick else METHODS))
    precisions = list(precisions or (("fp32",) if quick else ("fp32", "bf16")))
    models_to_run = list(models_to_run or (("smollm2-135m",) if quick else ("smollm2-135m", "smollm2-360m")))
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise ValueError(f"Only fp32 and bf16 bases can be measured here (4-bit needs bitsandbytes on a GPU), got {p!r}.")
    settings = {"rank": rank, "targets": targets, "virtual_tokens": virtual_tokens}
    task = data_mod.load_task("reviews")
    rows = []
    with _compute_precision("fp32"):  # load the real model in fp32; each run picks its own base precision
        embedded, tokenizer = models.load()
    for name in models_to_run:
        base = embedded if name == "smollm2-135m" else build_model(name).to(embedded.device)
        for precision in precisions:
            for method in methods:
                started = time.perf_counter()
                record = measure_step(base, tokenizer, task, method, precision, batch, seq_len, steps=steps, **settings)
                for row in compare_rows(name, name, record, method, precision, **settings):
                    row["seconds"] = time.perf_counter() - started
                    rows.append(row)
        del base
    return rows
