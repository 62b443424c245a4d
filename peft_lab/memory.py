"""Memory of a training step, in one place: what a step holds (weights, gradients, optimizer state, weight
casts, the activations autograd saves), measured on a real step, the process peak, the textbook arithmetic
that predicts the static part, and the formulas that predict every part from a model's architecture numbers.

Explained in notebook 00_setup_and_baseline, section 6 (measured), and 05_showdown, section 7 (predicted).
``train.fit`` measures with it; ``measure`` and the notebooks read its tables; the panels' guard asks
``rough_training_bytes``; ``planner`` asks ``predict`` for models that are never loaded and answers in words.
"""
from __future__ import annotations

import contextlib
import json
import threading

import torch

from .data import DATA_DIR
from .models import LLAMA_LINEARS


def _storage_key(t: torch.Tensor):
    return (t.device, t.untyped_storage().data_ptr())


HALF = (torch.bfloat16, torch.float16)
# the parts of a step's memory, as ``fit`` measures them and the planner predicts them
MEMORY_PARTS = ("weights", "gradients", "optimizer", "weight_casts", "activations")


@contextlib.contextmanager
def count_saved_activations(params, cast_dtype: torch.dtype | None = None):
    """Count the bytes autograd saves for backward; parameters (frozen or not) are excluded: they are weights.

    Under autocast a layer's fp32 weight is cast to half precision, and the cast copy is saved for
    the backward pass. That copy is a new tensor, but it is a *weight*, not an activation: a saved
    ``cast_dtype`` tensor equal to an fp32 weight cast to ``cast_dtype`` (or to its transpose) is
    counted as a weight cast, on its own line. Saved tensors often share memory (views, one tensor
    saved by two operations); each underlying storage is counted once.
    """
    param_storages = {_storage_key(p) for p in params}
    by_shape = {}
    if cast_dtype in HALF:
        for p in params:
            if p.dtype == torch.float32 and p.dim() == 2:
                by_shape.setdefault(tuple(p.shape), []).append(p)
                by_shape.setdefault(tuple(p.shape)[::-1], []).append(p)
    seen, candidates = {}, {}

    def pack(t):
        key = _storage_key(t)
        if key not in param_storages and key not in seen and key not in candidates:
            if t.dtype == cast_dtype and tuple(t.shape) in by_shape:
                candidates[key] = t  # decided after the forward pass, when the comparison cannot disturb it
            else:
                seen[key] = t.untyped_storage().nbytes()
        return t

    def is_weight_cast(t) -> bool:
        # Bookkeeping, not model arithmetic, so it runs past any TorchFunctionMode: the tests' pretend
        # accelerator (accelerator_check.py) cannot see the weight casts autocast makes inside torch, and would
        # take ``t`` for a host tensor meeting the model's weights. On a real device both are on the same one.
        with torch.no_grad(), torch._C.DisableTorchFunction():
            return any(torch.equal(t, w.detach().to(cast_dtype)) or torch.equal(t, w.detach().t().to(cast_dtype))
                       for w in by_shape[tuple(t.shape)] if w.numel() == t.numel())

    result = {"bytes": 0, "weight_cast_bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    casts = 0
    for key, t in candidates.items():
        if is_weight_cast(t):
            casts += t.untyped_storage().nbytes()
        else:
            seen[key] = t.untyped_storage().nbytes()
    result["bytes"] = sum(seen.values())
    result["weight_cast_bytes"] = casts


class PeakMemory:
    """The process peak while the block runs: CUDA's allocator peak, or the sampled resident set size."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def optimizer_state_bytes(optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))



def numbers_by_dtype(tensors) -> dict:
    """How many numbers are stored in each dtype, e.g. {"bfloat16": 134_515_008, "float32": 460_800}."""
    counts = {}
    for t in tensors:
        name = str(t.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + t.numel()
    return counts



# --- the textbook arithmetic -----------------------------------------------------------------------

# 4-bit: QLoRA's NF4 with double quantisation (Dettmers et al. 2023, section 3): half a byte a number, one 8-bit
# scale per block of 64, and one fp32 scale per 256 of those: 0.5 + 1/64 + 4/(64 x 256), about 0.516 B. (Without
# double quantisation, one fp32 scale per 64: 0.5625 B.)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "4-bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# a base stored in NF4 as nf4.py does it, counted per weight it stands for (the run's ``weight_dtypes``)
BYTES.update({"nf4 double-quantised": BYTES["4-bit"], "nf4": 0.5 + 4 / 64})
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


def rough_training_bytes(model) -> int:
    """What training ``model`` needs on top of its weights, for a panel's guard before it trains: a gradient and
    AdamW's two moments (12 bytes) per trainable number, plus activations of about a quarter of the weights
    (measured in notebook 00 for a batch of 8 short reviews). The weights themselves are already allocated.
    Rough on purpose: it reads a model in memory; ``predict`` plans one from its architecture numbers."""
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    return BYTES_PER_TRAINED * trainable + tensor_bytes(model.parameters()) // 4


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


# =================================================================================================
# Predicted from a model's architecture numbers alone (the planner's formulas; no weights loaded).
# ``data/model_configs/<name>.json`` holds hidden size, MLP size, layers, query and key/value heads, vocabulary and
# whether the embeddings are tied; the formulas below predict each part of MEMORY_PARTS for one training step.
# Checked against measured steps in planner.check_against_measurement (tests/test_planner.py).
# =================================================================================================

CONFIG_DIR = DATA_DIR / "model_configs"
REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
METHODS = ("full", "lora", "prefix", "prompt")
PRECISIONS = ("fp32", "bf16", "4-bit")


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


def resolve_config(cfg) -> dict:
    return load_config(cfg) if isinstance(cfg, str) else check_config(cfg)


def dims(cfg) -> dict:
    """The sizes every formula below uses: h, I, layers L, heads, kv-heads, head size, vocabulary V."""
    cfg = resolve_config(cfg)
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
        return list(LLAMA_LINEARS)
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in LLAMA_LINEARS]
    if unknown or not targets:
        raise ValueError(f"Unknown LoRA targets {unknown or targets}; choose among {', '.join(LLAMA_LINEARS)} "
                         "or 'all-linear'.")
    return targets


def trainable_count(cfg, method: str, rank: int = 8, targets=("q_proj", "v_proj"), virtual_tokens: int = 20) -> int:
    """How many numbers ``method`` trains (LoRA's A and B, the prefix, the soft prompt, or everything)."""
    d, method = dims(cfg), check_method(method)
    if method == "full":
        return parameter_count(cfg)
    if method == "lora":
        shapes = linear_shapes(cfg)
        return d["L"] * sum(rank * sum(shapes[t]) for t in lora_targets(targets))
    if method == "prefix":  # a key and a value per layer, per key/value head, per virtual token
        return d["L"] * 2 * d["kv"] * d["hd"] * virtual_tokens
    return virtual_tokens * d["h"]  # prompt: one embedding-sized vector per virtual token


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; the planner knows {', '.join(METHODS)}.")
    return method


def check_precision(precision: str) -> str:
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
        frozen = BYTES["4-bit"] * groups["linear"] + 2 * (groups["embeddings"] + groups["other"])
    else:
        frozen = BYTES["float32" if base_precision == "fp32" else "bfloat16"] * parameter_count(cfg)
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
    d, method = dims(cfg), check_method(method)
    if loss not in ("label", "text"):
        raise ValueError(f"loss must be 'label' (one token per row, as the workbook trains) or 'text', got {loss!r}.")
    a = 4 if check_precision(base_precision) == "fp32" else 2
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
    stream = 4 if full or check_precision(base_precision) == "fp32" else 2
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
    """Predicted bytes of one training step, by part (``MEMORY_PARTS``, then ``recompute``) and in ``total``.

    ``cfg``: a name from ``configs()`` or a config dict. ``base_precision``: how the frozen base is
    stored ("fp32", "bf16", "4-bit": NF4 with double quantisation, as QLoRA stores it); for full fine-tuning it
    sets the compute precision (weights stay fp32 masters; a 4-bit base is only for PEFT methods, as in QLoRA).
    ``loss``: "label" (one position a row, as the workbook's tasks train) or "text" (every position: the
    whole-text loss of pre-training and instruction tuning, whose batch x tokens x vocabulary log-probabilities
    are often the largest activation). ``checkpointing``: gradient checkpointing (``recompute`` is then the one
    block computed again in the backward pass, part of the peak; 0 without it). ``padded``: rows padded to the
    longest, so attention gets a mask (the workbook's batches); False for rows of equal length (packed texts).
    """
    cfg, method, base_precision = resolve_config(cfg), check_method(method), check_precision(base_precision)
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
