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
import json
import os
import time

from . import data as data_mod
from . import memory
from .models import LLAMA_LINEARS
from .memory import MEMORY_PARTS

CONFIG_DIR = data_mod.DATA_DIR / "model_configs"
REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
METHODS = ("full", "lora", "prefix", "prompt")
PRECISIONS = ("fp32", "bf16", "4-bit")
LAYER_LINEARS = LLAMA_LINEARS
PARTS = MEMORY_PARTS
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


# --- configs ------------------------------------------------------------------------------------

def configs() -> list:
    """The model names the planner knows: one JSON file each in ``data/model_configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> dict:
    """The architecture numbers of model ``name`` (see ``configs()``), checked."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"Unknown model config {name!r}. Known: {', '.join(configs())}. For another model, "
                         f"write {CONFIG_DIR.name}/{name}.json with the fields {', '.join(REQUIRED)}.")
    return check_config(json.loads(path.read_text(encoding="utf-8")))


def check_config(cfg: dict) -> dict:
    """``cfg`` itself, once it holds every field the planner needs (a clear error names what is missing)."""
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"The model config lacks {', '.join(missing)}; copy them from the model's config.json.")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (grouped-query attention).")
    return cfg


def _config(cfg) -> dict:
    return load_config(cfg) if isinstance(cfg, str) else check_config(cfg)


def dims(cfg) -> dict:
    """The sizes every formula below uses: h, I, layers L, heads, kv-heads, head size, vocabulary V."""
    cfg = _config(cfg)
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    return {"h": h, "I": cfg["intermediate_size"], "L": cfg["num_hidden_layers"], "heads": heads,
            "kv": cfg["num_key_value_heads"], "hd": hd, "V": cfg["vocab_size"],
            "tied": bool(cfg["tie_word_embeddings"]),
            # Qwen2 gives q, k and v a bias (o has none); Llama and SmolLM2 have no biases
            "qkv_bias": cfg.get("attention_bias", cfg["model_type"] == "qwen2")}


def linear_shapes(cfg) -> dict:
    """(in, out) of each linear layer of one decoder block, by its name."""
    d = dims(cfg)
    q, kv = d["heads"] * d["hd"], d["kv"] * d["hd"]
    return {"q_proj": (d["h"], q), "k_proj": (d["h"], kv), "v_proj": (d["h"], kv), "o_proj": (q, d["h"]),
            "gate_proj": (d["h"], d["I"]), "up_proj": (d["h"], d["I"]), "down_proj": (d["I"], d["h"])}


def parameter_groups(cfg) -> dict:
    """Parameter counts by kind: decoder linear weights (what 4-bit quantises), embeddings, the rest."""
    d = dims(cfg)
    linear = d["L"] * sum(i * o for i, o in linear_shapes(cfg).values())
    bias = d["L"] * (d["heads"] + 2 * d["kv"]) * d["hd"] if d["qkv_bias"] else 0
    norms = (2 * d["L"] + 1) * d["h"]  # two RMSNorms a block, one at the end
    embeddings = d["V"] * d["h"] * (1 if d["tied"] else 2)  # a tied output head shares the input table
    return {"linear": linear, "embeddings": embeddings, "other": bias + norms}


def parameter_count(cfg) -> int:
    """All parameters of the model, a tied embedding counted once."""
    return sum(parameter_groups(cfg).values())


# --- what each method trains --------------------------------------------------------------------

def lora_targets(targets) -> list:
    """The layer names ``targets`` selects: a list of names, one name, or "all-linear" (every block linear)."""
    if targets == "all-linear":
        return list(LAYER_LINEARS)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in LAYER_LINEARS]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA targets {unknown or targets}; choose among {', '.join(LAYER_LINEARS)} "
                         "or 'all-linear'.")
    return targets


def trainable_count(cfg, method: str, rank: int = 8, targets=("q_proj", "v_proj"), virtual_tokens: int = 20) -> int:
    """How many numbers ``method`` trains (LoRA's A and B, the prefix, the soft prompt, or everything)."""
    d, method = dims(cfg), _method(method)
    if method == "full":
        return parameter_count(cfg)
    if method == "lora":
        shapes = linear_shapes(cfg)
        return d["L"] * sum(rank * sum(shapes[t]) for t in lora_targets(targets))
    if method == "prefix":  # a key and a value per layer, per key/value head, per virtual token
        return d["L"] * 2 * d["kv"] * d["hd"] * virtual_tokens
    return virtual_tokens * d["h"]  # prompt: one embedding-sized vector per virtual token


def _method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; the planner knows {', '.join(METHODS)}.")
    return method


def _precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown base precision {precision!r}; choose among {', '.join(PRECISIONS)}.")
    return precision


# --- the prediction -----------------------------------------------------------------------------

def weight_bytes(cfg, method: str, base_precision: str, trainable: int) -> float:
    """The frozen base in its storage precision, plus the trained numbers in fp32."""
    if method == "full":
        return 4 * parameter_count(cfg)  # fp32 master weights, whatever the compute precision
    groups = parameter_groups(cfg)
    if base_precision == "4-bit":  # QLoRA: the block linears in NF4 (+ scales), the rest in bf16
        frozen = memory.BYTES["4-bit"] * groups["linear"] + 2 * (groups["embeddings"] + groups["other"])
    else:
        frozen = memory.BYTES["float32" if base_precision == "fp32" else "bfloat16"] * parameter_count(cfg)
    return frozen + 4 * trainable


def weight_cast_bytes(cfg, method: str, base_precision: str, rank: int, targets) -> int:
    """Half copies of fp32 weights that autocast makes and saves for backward (none in fp32).

    Full fine-tuning: every block linear and the output head (the tied embedding table, cast for the
    head; the lookup itself is not cast). LoRA: A and B, except the first block's q/k/v A, whose input
    needs no gradient. Prefix and prompt: their casts feed a concatenation, which saves nothing.
    """
    if base_precision == "fp32" or method in ("prefix", "prompt"):
        return 0
    d = dims(cfg)
    if method == "full":
        return 2 * (parameter_groups(cfg)["linear"] + d["V"] * d["h"])
    shapes, names = linear_shapes(cfg), lora_targets(targets)
    first_layer_a = sum(rank * shapes[t][0] for t in names if t in ("q_proj", "k_proj", "v_proj"))
    return 2 * (d["L"] * sum(rank * sum(shapes[t]) for t in names) - first_layer_a)


def activation_bytes(cfg, method: str, base_precision: str = "fp32", batch: int = 8, seq_len: int = 64,
                     rank: int = 8, targets=("q_proj", "v_proj"), virtual_tokens: int = 20,
                     loss: str = "label", checkpointing: bool = False, padded: bool = True) -> int:
    """Bytes autograd saves for backward in one step of a Llama-style decoder (SmolLM2, Qwen2.5, Llama 3).

    With gradient ``checkpointing`` each block keeps only its input (``checkpointing.py``); what lies outside the
    blocks is kept as without it. The backward pass then computes one block's insides again at a time:
    ``recompute_bytes``.

    Derived tensor by tensor from what ``memory.count_saved_activations`` lists on a real step (SDPA
    attention, transformers' Llama/Qwen2 blocks), per block and per token; ``a`` is the compute
    precision's bytes (4 in fp32, 2 under bf16/fp16 autocast, also for a 4-bit base):

    * each RMSNorm keeps its input upcast to fp32 and 1/rms: 4 (h + 1) B. Full fine-tuning also keeps
      the normalised x (for the norm's weight, 4 h) and the input of the linears after it (a h; under
      autocast each linear casts its own copy: 3 for q, k, v, 2 for gate, up).
    * attention keeps q, k, v (k and v repeated to all query heads), its output (a each, heads x head
      size), the log-sum-exp (4 B per head) and the padding mask (a per key position).
    * the MLP keeps gate's output, SiLU's output and up's output (3 a I); full fine-tuning also the
      input of down (a I), which trains.
    * frozen linears keep nothing (their weight suffices for the input's gradient); a LoRA layer keeps
      its input (shared between layers reading the same tensor in fp32, one copy each under autocast)
      and A's output (a r).
    * the head: the log-softmax over the vocabulary, fp32, at the label position (``loss="label"``, as
      the workbook trains) or at every position (``loss="text"``). The head itself runs only at the positions
      a loss reads (``train.label_logits``); trained (full fine-tuning), it keeps its input there.

    Where gradients start matters: with LoRA and prefix tuning the first block's input needs no
    gradient, so its first RMSNorm keeps nothing. Prompt tuning runs P extra positions everywhere;
    prefix tuning gives every block P extra keys and values. Small tensors (token ids, the rotary
    cos/sin shared by all blocks) are included; the GPU's attention kernels save the same kinds of
    tensors, give or take padding.
    """
    terms = _saved_terms(cfg, method, base_precision, batch, seq_len, rank, targets, virtual_tokens, loss, padded)
    blocks = terms["kept_inputs"] if checkpointing else terms["blocks"]
    return batch * (blocks + terms["outside"])


def recompute_bytes(cfg, method: str, base_precision: str = "fp32", batch: int = 8, seq_len: int = 64,
                    rank: int = 8, targets=("q_proj", "v_proj"), virtual_tokens: int = 20, loss: str = "label",
                    padded: bool = True) -> int:
    """With gradient checkpointing, the backward pass runs each block's forward pass again and holds that one
    block's saved tensors until its gradients are computed: the extra peak, one block of ``activation_bytes``."""
    return batch * _saved_terms(cfg, method, base_precision, batch, seq_len, rank, targets, virtual_tokens, loss,
                                padded)["block"]


def _saved_terms(cfg, method, base_precision, batch, seq_len, rank, targets, virtual_tokens, loss, padded) -> dict:
    """Bytes per row: ``block`` (one block's saved tensors), ``blocks`` (all blocks'), ``kept_inputs`` (what the
    blocks keep under checkpointing: their inputs) and ``outside`` (final norm, head, rotary tables, token ids)."""
    d, method = dims(cfg), _method(method)
    if loss not in ("label", "text"):
        raise ValueError(f"loss must be 'label' (one token per row, as the workbook trains) or 'text', got {loss!r}.")
    a = 4 if _precision(base_precision) == "fp32" else 2
    h, I, L, q_w = d["h"], d["I"], d["L"], d["heads"] * d["hd"]
    P = virtual_tokens if method in ("prefix", "prompt") else 0
    tq = seq_len + (P if method == "prompt" else 0)  # query positions a block runs
    tk = seq_len + P  # key positions attention looks at
    full = method == "full"

    norm = 4 * (h + 1) * tq  # fp32 input + 1/rms
    if full:
        norm += 4 * h * tq  # the normalised x, for the norm's own weight
    # trained linears keep their input: in fp32 one tensor serves q, k, v (and another gate, up);
    # autocast gives each linear its own half copy
    attn_inputs = (3 if a == 2 else 1) * a * h * tq if full else 0
    mlp_inputs = (2 if a == 2 else 1) * a * h * tq if full else 0
    # SDPA keeps q and its output (tq positions), k and v (tk positions; with a padding mask transformers
    # repeats them to every query head first, and keeps the mask; rows of equal length need neither: ``padded``),
    # and the fp32 log-sum-exp per head
    kv_w = q_w if padded or method == "prefix" else d["kv"] * d["hd"]
    mask = a * tq * tk if padded or method == "prefix" else 0
    attention = a * (2 * q_w * tq + 2 * kv_w * tk) + 4 * d["heads"] * tq + mask
    mlp = (4 if full else 3) * a * I * tq  # gate out, SiLU out, up out (+ down's input when it trains)
    lora = _lora_saved(cfg, a, tq, rank, targets) if method == "lora" else 0
    block = 2 * norm + attn_inputs + mlp_inputs + attention + mlp + lora

    first_block_missing = 4 * (h + 1) * tq if method in ("lora", "prefix") else 0
    # the head runs only where the loss reads it (train.label_logits): for the label loss at the batch's distinct
    # last positions, at most one per row, planned at the worst case of min(batch, tokens); for a text loss at every one
    head_positions = tq if loss == "text" else min(batch, seq_len)
    final = norm + (a * h * head_positions if full else 0)  # the last RMSNorm (and, trained, the head's input)
    head = 4 * d["V"] * (1 if loss == "label" else seq_len - 1)
    rope = 2 * tq * d["hd"] * (4 if full else a)  # cos and sin, computed once and shared by every block
    ids = 8 * tq if full else 0  # token ids, kept by the trained embedding lookup
    # under checkpointing each block keeps its input: the residual stream, in the embedding table's dtype (fp32
    # masters for full fine-tuning and an fp32 base; bf16 for a bf16 base, and for a 4-bit one, whose embeddings stay bf16)
    stream = 4 if full or _precision(base_precision) == "fp32" else 2
    # (plus the one boolean attention mask every block is handed, held once, where rows are padded)
    held_mask = tq * tk if mask else 0
    return {"block": block, "blocks": L * block - first_block_missing, "kept_inputs": L * stream * h * tq + held_mask,
            "outside": final + head + rope + ids}


def _lora_saved(cfg, a: int, tq: int, rank: int, targets) -> int:
    """Per row and block: the inputs LoRA layers keep for A's gradient, and A's outputs for B's."""
    shapes, names = linear_shapes(cfg), lora_targets(targets)
    if a == 2:  # autocast: every LoRA layer casts (and keeps) its own copy of its input
        inputs = sum(shapes[t][0] for t in names)
    else:  # fp32: q/k/v share one input, gate/up another; o's input is attention's output, kept already
        groups = {"qkv" if t in ("q_proj", "k_proj", "v_proj") else "gu" if t in ("gate_proj", "up_proj") else t
                  for t in names}
        inputs = sum(shapes[{"qkv": "q_proj", "gu": "gate_proj"}.get(g, g)][0] for g in groups if g != "o_proj")
    return a * tq * (inputs + rank * len(names))


def predict(cfg, method: str, base_precision: str = "fp32", batch: int = 8, seq_len: int = 64, rank: int = 8,
            targets=("q_proj", "v_proj"), virtual_tokens: int = 20, loss: str = "label",
            checkpointing: bool = False, padded: bool = True) -> dict:
    """Predicted bytes of one training step, by part (``PARTS``, then ``recompute``) and in ``total``.

    ``cfg``: a name from ``configs()`` or a config dict. ``base_precision``: how the frozen base is
    stored ("fp32", "bf16", "4-bit": NF4 with double quantisation, as QLoRA stores it); for full fine-tuning it
    sets the compute precision (weights stay fp32 masters; a 4-bit base is only for PEFT methods, as in QLoRA).
    ``loss``: "label" (one position a row, as the workbook's tasks train) or "text" (every position: the
    whole-text loss of pre-training and instruction tuning, whose batch x tokens x vocabulary log-probabilities
    are often the largest activation). ``checkpointing``: gradient checkpointing (``recompute`` is then the one
    block computed again in the backward pass, part of the peak; 0 without it). ``padded``: rows padded to the
    longest, so attention gets a mask (the workbook's batches); False for rows of equal length (packed texts).
    """
    cfg, method, base_precision = _config(cfg), _method(method), _precision(base_precision)
    if method == "full" and base_precision == "4-bit":
        raise ValueError("Full fine-tuning trains every weight, kept in fp32: a 4-bit base is for LoRA, prefix or "
                         "prompt tuning (QLoRA). Choose base_precision 'fp32' or 'bf16' for full fine-tuning.")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if method == "lora" and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}.")
    if method in ("prefix", "prompt") and virtual_tokens < 1:
        raise ValueError(f"virtual_tokens must be at least 1, got {virtual_tokens}.")
    trainable = trainable_count(cfg, method, rank, targets, virtual_tokens)
    parts = {
        "weights": weight_bytes(cfg, method, base_precision, trainable),
        "gradients": 4 * trainable,
        "optimizer": 8 * trainable,
        "weight_casts": weight_cast_bytes(cfg, method, base_precision, rank, targets),
        "activations": activation_bytes(cfg, method, base_precision, batch, seq_len, rank, targets,
                                        virtual_tokens, loss, checkpointing, padded),
        "recompute": (recompute_bytes(cfg, method, base_precision, batch, seq_len, rank, targets, virtual_tokens, loss,
                                      padded) if checkpointing else 0),
    }
    parts["total"] = sum(parts.values())
    parts["trainable"] = trainable
    return parts


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

    cfg = _config(cfg)
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
                         progress=False, log=False, method=method)


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
