"""LoRA, low-rank adaptation (Hu et al. 2021), built from scratch.

Fine-tuning changes a weight matrix W (out x in) by some update dW. LoRA bets that dW has low rank
and trains it as the product of two thin matrices, while W itself stays frozen::

                 frozen                      trained
            +-------------+      +---+
     x ---> |      W      | ---> |   |
            |  out x in   |      | + | ---> y = W x + (alpha / r) * B A x
            +-------------+      |   |
     x ---> [ A: r x in ] -----> [ B: out x r ]
              random init         zeros at step 0, so the model starts unchanged

With r much smaller than in and out, A and B hold r * (in + out) numbers instead of in * out.
After training, B A can be added into W ("merged") and the adapted model costs nothing extra.

The on-disk format (``save`` / ``load``) is the one Hugging Face ``peft`` uses, so adapters move
freely between this package and ``peft.PeftModel``.

Explained in notebook 02_lora.
"""
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import base as contract

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # how peft names the wrapped model in its saved keys
LINEAR_TYPES = (nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layer, its weight stored (in, out)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + scaling * B(A(dropout(x))).

    Explained in notebook 02_lora, section 2.
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, init="kaiming", rslora=False):
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base = base.requires_grad_(False)  # the original module, kept as is: remove() gives it back
        # GPT-2's Conv1D stores its weight transposed (in, out); only merging needs to know.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        in_f, out_f = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        # Half-precision weights are fine to run but poor to train: keep the adapter in fp32 then.
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(in_f, rank, **kw)   # A: r x in
        self.lora_B = nn.Linear(rank, out_f, **kw)  # B: out x r
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's own default
        else:
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: dW = B A = 0, the model is unchanged at step 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # The original LoRA scales by alpha / r so that, at its initialisation and with plain SGD, the
        # update's size does not grow with r. Under Adam that argument does not hold: rsLoRA (Kalajdzievski
        # 2023) shows that alpha / r shrinks the update as r grows (learning slows at large ranks) and that
        # alpha / sqrt(r) keeps it steady. So a rank sweep under alpha / r changes the step size with the
        # rank; compare ranks with rslora=True, or retune the learning rate per rank.
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # B A already lives inside the base weight: no extra work at all
            return y
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        return y + (self.scaling * self.lora_B(self.lora_A(x))).to(y.dtype)

    def delta_weight(self):
        """dW = scaling * B A, laid out like the base weight (transposed for Conv1D)."""
        dw = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        return dw.T if self.fan_in_fan_out else dw

    @torch.no_grad()
    def merge(self):
        """W <- W + dW. Explained in notebook 02_lora, section 4."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - dW: the inverse of merge, up to float rounding."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Finding layers
# ----------------------------------------------------------------------------------------------

def _linear_modules(model):
    """(full name, module) for every linear layer, LoRA-wrapped ones included but not their insides."""
    found, skip = [], ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue  # the base, lora_A and lora_B inside a LoRALinear are not layers of the model
        if isinstance(module, LoRALinear):
            skip = (*skip, name + "." if name else "")  # "" (a bare LoRALinear): skip all below
            found.append((name, module))
        elif isinstance(module, LINEAR_TYPES):
            found.append((name, module))
    return found


def linear_module_names(model):
    """Sorted short names (last part of the path) of the model's linear layers, e.g. ['c_attn', ...].

    These are the names ``apply(targets=...)`` accepts. Explained in notebook 02_lora, section 1.
    """
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _linear_modules(model) if name})


def lora_layers(model):
    """{full module name: LoRALinear} for every LoRA layer in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_as_trainable(model):
    """Freeze every parameter, then unfreeze the LoRA A and B matrices. Returns the model."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model


def _matches(name, targets):
    # Same rule as a peft `target_modules` list: the full name, or its last dotted parts.
    return any(name == t or name.endswith("." + t) for t in targets)


def _resolve_targets(model, targets):
    """Full names of the layers `targets` selects (a list of names, one name, or 'all-linear')."""
    layers = _linear_modules(model)
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Every linear layer except the output head: the head maps to the vocabulary, and
        # adapting it would mean a huge B (vocab x r) for little gain.
        chosen = [n for n, m in layers if m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        chosen = [n for n, _ in layers if _matches(n, targets)]
    if not chosen:
        raise ValueError(
            f"No linear layer matches targets={targets!r}. This model's linear layers are named: "
            f"{', '.join(linear_module_names(model))} (or use targets='all-linear')."
        )
    return chosen


# ----------------------------------------------------------------------------------------------
# Apply, merge, unmerge, remove
# ----------------------------------------------------------------------------------------------

def check_rank_and_alpha(rank, alpha) -> None:
    """Refuse a rank or alpha that cannot train, with what to choose instead (LoRA and DoRA share it)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a whole number of at least 1 (the inner size of A and B), got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}: the update is scaled by alpha/rank, so 0 "
                         "trains nothing and a negative alpha flips it. A usual choice is alpha = 2 x rank.")


def apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, init="kaiming",
          rslora=False):
    """Wrap the target layers of `model` in LoRALinear and freeze everything else, in place.

    targets: module names matched like peft's `target_modules` list (the name equals a target or
    ends with "." + target), a single name, or "all-linear" (every linear layer but the output head).
    Returns the model, with ``model.peft_lab_info`` describing the adapter.
    Explained in notebook 02_lora, section 3.
    """
    check_rank_and_alpha(rank, alpha)
    existing = lora_layers(model)
    if existing:
        raise ValueError(
            f"This model already has LoRA layers ({', '.join(list(existing)[:4])}, ...). "
            "Call lora.remove(model) first, or apply once with all the targets you want."
        )
    names = _resolve_targets(model, targets)
    # Remember which parameters were trainable, so that remove() can give the model back as it was.
    model._peft_lab_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout, init, rslora))
    mark_only_lora_as_trainable(model)
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = [targets] if isinstance(targets, str) else list(targets)
    model.peft_lab_info = {
        "method": "lora", "rank": rank, "alpha": alpha, "targets": targets, "dropout": dropout,
        "init": init, "rslora": rslora, "scaling": alpha / math.sqrt(rank) if rslora else alpha / rank,
        "modules": names,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model


def _require_lora(model):
    return contract.require_layers(model, lora_layers, "LoRA")


def merge(model):
    """Add each B A into its frozen weight: the model then runs as fast as the base model.

    Explained in notebook 02_lora, section 4.
    """
    return contract.each_layer(model, lora_layers, "LoRA", "merge")


def unmerge(model):
    """Undo merge: subtract each B A again (exact up to float rounding)."""
    return contract.each_layer(model, lora_layers, "LoRA", "unmerge")


def remove(model):
    """Put the original layers back and drop the adapter; returns the model.

    The original module objects come back untouched, their weights bit-identical to before apply.
    A merged model is refused: its weights were changed, and unmerging restores them only up to
    float rounding. Call ``unmerge(model)`` first if that is good enough.
    Explained in notebook 02_lora, section 6.
    """
    layers = _require_lora(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} LoRA layers are merged into their base weights ({merged[0]}, ...), so "
            "removing them cannot give the original weights back bit for bit. "
            "Call lora.unmerge(model) first (the weights then match the originals up to float rounding)."
        )
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    saved = getattr(model, "_peft_lab_requires_grad", {})
    for n, p in model.named_parameters():
        p.requires_grad_(saved.get(n, True))
    for attr in ("_peft_lab_requires_grad", "peft_lab_info"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ----------------------------------------------------------------------------------------------
# Save and load, in the Hugging Face peft layout
# ----------------------------------------------------------------------------------------------

def _base_name(model):
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def save(model, folder):
    """Write the adapter (A and B only, a few MB at most) as peft does: adapter_config.json and
    adapter_model.safetensors. ``peft.PeftModel.from_pretrained(base, folder)`` can read it.

    Explained in notebook 02_lora, section 6.
    """
    from safetensors.torch import save_file

    layers = _require_lora(model)
    info = model.peft_lab_info
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _base_name(model),
        "r": info["rank"],
        "lora_alpha": info["alpha"],
        "lora_dropout": info["dropout"],
        "target_modules": info["targets"],
        "use_rslora": info["rslora"],
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "bias": "none",
        "init_lora_weights": True if info["init"] == "kaiming" else "gaussian",
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(folder)


# peft features this package does not implement: loading such an adapter would silently differ.
_UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "exclude_modules", "target_parameters", "trainable_token_indices",
                "layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora")


def _read_config(folder):
    config = contract.read_adapter_config(folder, "LoRA")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder!r} holds a {config.get('peft_type')} adapter, not LoRA.")
    used = [k for k in _UNSUPPORTED if config.get(k) not in (None, False, {}, [])]
    if config.get("bias", "none") != "none":
        used.append("bias")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        used.append(f"init_lora_weights={init!r} (it also changes the base weights)")
    if used:
        raise ValueError(f"The adapter in {folder!r} uses peft features this package does not support: "
                         f"{', '.join(used)}.")
    return config


def load(model, folder):
    """Apply LoRA to `model` as the adapter's config says and load its A and B; returns the model.

    Reads adapters written by ``save`` or by peft's ``save_pretrained``. If the model already has
    LoRA layers, the weights are loaded into them (rank, alpha and targets must agree).
    Raises ValueError when the adapter was made for another base model (missing modules, other
    shapes) or with another rank. Explained in notebook 02_lora, section 6.
    """
    return attach_and_load(model, folder, _read_config(folder), "LoRA", apply, lora_layers, _load_weights, remove)


def attach_and_load(model, folder, config, name, apply_fn, find_layers, load_weights, remove_fn):
    """The loading steps LoRA and its variants (DoRA) share: read the settings from ``config``, apply
    them (or check the layers already there agree), load the weights; a failed load leaves a fresh
    model as it came."""
    from safetensors.torch import load_file

    rank, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    targets = config["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":  # peft: a single string is a regex
        import re
        targets = [n for n, _ in _linear_modules(model) if re.fullmatch(targets, n)] or [targets]
    saved_for, ours = config.get("base_model_name_or_path"), _base_name(model)
    if saved_for and ours and saved_for != ours:
        warnings.warn(f"The adapter was saved for {saved_for!r}, this model is {ours!r}.")

    applied_here = not find_layers(model)
    if applied_here:
        try:
            apply_fn(model, rank=rank, alpha=alpha, targets=targets, dropout=config.get("lora_dropout", 0.0),
                     init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming",
                     rslora=rslora)
        except ValueError as e:
            raise ValueError(f"The adapter in {folder!r} does not fit this model (made for another "
                             f"base model?): {e}") from None
    else:
        info = model.peft_lab_info
        have = (info["rank"], info["alpha"], info["rslora"])
        if have != (rank, alpha, rslora):
            raise ValueError(
                f"The adapter has rank={rank}, alpha={alpha}, rslora={rslora}, but this model's {name} "
                f"layers have rank={have[0]}, alpha={have[1]}, rslora={have[2]}. Load onto a fresh base "
                f"model (load applies {name} itself) or apply with the same settings."
            )
    try:
        load_weights(model, contract.read_weights(os.path.join(folder, WEIGHTS_NAME)))
    except ValueError:
        if applied_here:
            remove_fn(model)  # leave the model as it came
        raise
    return model


def _load_weights(model, state):
    layers = lora_layers(model)
    weights = {}
    for key, tensor in state.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        module, _, kind = name.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"Unexpected key in the adapter file: {key!r}")
        weights.setdefault(module, {})[kind[0]] = tensor
    missing, extra = sorted(set(layers) - set(weights)), sorted(set(weights) - set(layers))
    if extra:
        raise ValueError(f"The adapter has weights for modules this model does not have: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (made for another base model?)")
    if missing:
        raise ValueError(f"The adapter has no weights for these LoRA layers of the model: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (made for another base model?)")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name} is merged: call lora.unmerge(model) before loading.")
        A, B = weights[name].get("A"), weights[name].get("B")
        if A is None or B is None:
            raise ValueError(f"The adapter file lacks lora_{'A' if A is None else 'B'} for {name}.")
        if A.shape[0] != layer.rank or B.shape[1] != layer.rank:
            raise ValueError(f"Rank differs at {name}: the adapter's A, B have rank {A.shape[0]}, "
                             f"the model's LoRA layer has rank {layer.rank}.")
        if A.shape != layer.lora_A.weight.shape or B.shape != layer.lora_B.weight.shape:
            raise ValueError(
                f"Shapes differ at {name}: adapter A {tuple(A.shape)}, B {tuple(B.shape)}; model A "
                f"{tuple(layer.lora_A.weight.shape)}, B {tuple(layer.lora_B.weight.shape)} "
                "(made for a base model with another hidden size?)")
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
