"""IA3, "infused adapter by inhibiting and amplifying inner activations" (Liu et al. 2022).

The smallest PEFT method in this workbook: no new matrices at all, only vectors that rescale what a
few frozen layers compute, one number per feature, all starting at 1 (the model starts unchanged)::

    keys, values (output scaling)              MLP down projection ("feedforward": input scaling)

    x ---> [ W_k ] ---> (*) l_k ---> k         h ---> (*) l_ff ---> [ W_down ] ---> y
    x ---> [ W_v ] ---> (*) l_v ---> v                  ^ one number per hidden unit of the MLP
                         ^ one number per output feature

The paper rescales the attention keys and values and the MLP's hidden activations, i.e. the input
of its last (down) projection. For SmolLM2-135M that is 30 x (192 + 192 + 1536) = 57,600 numbers,
about 0.04 % of the model. Since y = W (l * x) = (W diag(l)) x and l * (W x + b) = diag(l) W x + l b,
both kinds fold into the frozen weights (``merge``) and the tuned model then costs nothing extra.

Default targets per architecture (the paper's choice; peft's too for Llama and GPT-2, while peft's
default for Qwen2 takes q_proj instead of k_proj):

    Llama-style (SmolLM2, Qwen2, ...)   k_proj, v_proj (output)  +  down_proj (feedforward, input)
    GPT-2                               c_attn (output)          +  mlp.c_proj (feedforward, input)

GPT-2 fuses q, k and v into one layer, c_attn, whose output is [q | k | v]: scaling its output
(as peft does) scales the queries too, 3 x hidden numbers per layer instead of the paper's 2 x.
GPT-2's layers are transformers' Conv1D, weight stored (in, out); only merging needs to know.

``save`` / ``load`` use peft's layout (IA3Config with target_modules and feedforward_modules; one
``<module>.ia3_l`` per layer, shape (out, 1) for output scaling and (1, in) for feedforward layers),
so adapters move both ways between this package and ``peft.PeftModel``.

Explained in notebook 06_beyond_lora, section 3.
"""
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import lora
from . import base as contract
from .lora import CONFIG_NAME, KEY_PREFIX, LINEAR_TYPES, WEIGHTS_NAME

VECTOR = "ia3_l"  # peft's name for the scaling vector, in its modules and in its saved keys

# (layer names a model must have, default targets, default feedforward targets): the first layout
# whose names the model has gives the defaults of apply(targets=None).
LAYOUTS = (
    (("c_attn", "c_fc", "c_proj"), ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # GPT-2
    (("k_proj", "v_proj", "down_proj"), ["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # Llama-style
)


class IA3Linear(nn.Module):
    """A frozen linear layer whose output (or, for a feedforward layer, input) is scaled per feature:
    y = base(x) * l, or y = base(x * l) when ``feedforward``.

    Explained in notebook 06_beyond_lora, section 3.
    """

    def __init__(self, base, feedforward=False):
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise TypeError(f"IA3Linear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base = base.requires_grad_(False)  # the original module, kept as is: remove() gives it back
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores its weight (in, out)
        in_f, out_f = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
        self.feedforward = feedforward
        # Half-precision weights are fine to run but poor to train: keep the vector in fp32 then.
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        # Ones: every feature passes unchanged, so the model starts as the base model.
        self.ia3_l = nn.Parameter(torch.ones(in_f if feedforward else out_f, device=base.weight.device, dtype=dtype))
        self.merged = False

    def forward(self, x):
        if self.merged:  # the scaling already lives inside the base weight (and bias)
            return self.base(x)
        if self.feedforward:
            return self.base((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        y = self.base(x)
        return (y * self.ia3_l).to(y.dtype)

    def _weight_scale(self):
        """ia3_l shaped to scale the base weight along the axis it acts on (see the table)."""
        # weight layout      output scaling   input scaling (feedforward)
        # Linear (out, in)   rows: (out, 1)   columns: (1, in)
        # Conv1D (in, out)   columns: (1, out) rows: (in, 1)
        along_rows = self.feedforward == self.fan_in_fan_out
        return self.ia3_l.view(-1, 1) if along_rows else self.ia3_l.view(1, -1)

    @torch.no_grad()
    def merge(self):
        """W <- W * l along the scaled axis (and b <- b * l for output scaling)."""
        if self.merged:
            return
        weight, bias = self.base.weight, self.base.bias
        weight.copy_((weight * self._weight_scale()).to(weight.dtype))
        if not self.feedforward and bias is not None:  # l * (W x + b): the bias is scaled too
            bias.copy_((bias * self.ia3_l).to(bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W / l: the inverse of merge, up to float rounding. Refused where l holds a zero."""
        if not self.merged:
            return
        if (self.ia3_l == 0).any():
            raise ValueError("This IA3 vector holds zeros: merging multiplied those features by 0 and "
                             "dividing cannot bring them back. Keep the merged model, or reload the base.")
        weight, bias = self.base.weight, self.base.bias
        weight.copy_((weight / self._weight_scale()).to(weight.dtype))
        if not self.feedforward and bias is not None:
            bias.copy_((bias / self.ia3_l).to(bias.dtype))
        self.merged = False

    def extra_repr(self):
        return f"{'feedforward (input)' if self.feedforward else 'output'} scaling, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Finding layers
# ----------------------------------------------------------------------------------------------

def ia3_layers(model):
    """{full module name: IA3Linear} for every IA3 layer in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def linear_module_names(model):
    """Sorted short names of the model's linear layers: the names ``apply(targets=...)`` accepts."""
    wrapped = {name + ".base" for name in ia3_layers(model)}  # an IA3 layer's insides count as the layer
    names = {name[: -len(".base")] if name in wrapped else name for name, _ in lora._linear_modules(model)}
    return sorted({name.rsplit(".", 1)[-1] for name in names if name})


def default_targets(model):
    """(targets, feedforward) that apply(targets=None) uses for this model, or None if it has no
    layout this module knows (then pass targets and feedforward yourself)."""
    short = set(linear_module_names(model))
    for needed, targets, feedforward in LAYOUTS:
        if short.issuperset(needed):
            return list(targets), list(feedforward)
    return None


def _is_feedforward(name, feedforward):
    # peft's rule for feedforward_modules (a plain suffix, no dot needed), so that saved adapters
    # pick the same layers in peft as here.
    return any(name.endswith(f) for f in feedforward)


def mark_only_ia3_as_trainable(model):
    """Freeze every parameter, then unfreeze the IA3 vectors. Returns the model."""
    model.requires_grad_(False)
    for layer in ia3_layers(model).values():
        layer.ia3_l.requires_grad_(True)
    return model


# ----------------------------------------------------------------------------------------------
# Apply, merge, unmerge, remove
# ----------------------------------------------------------------------------------------------

def apply(model, targets=None, feedforward=None):
    """Wrap the target layers of `model` in IA3Linear and freeze everything else, in place.

    targets: as in ``lora.apply`` (a list of names matched like peft's `target_modules`, one name,
    or "all-linear"); None: this architecture's default (see ``default_targets``).
    feedforward: which of the targeted layers scale their *input* (names matched as peft does: the
    full name ends with one); None: the default feedforward names among the targeted layers; []: none.
    Returns the model, with ``model.peft_lab_info``. Explained in notebook 06_beyond_lora, section 3.
    """
    existing = ia3_layers(model) or lora.lora_layers(model)
    if existing:
        kind = "IA3" if ia3_layers(model) else "LoRA/DoRA"
        raise ValueError(f"This model already has {kind} layers ({', '.join(list(existing)[:4])}, ...). "
                         "Call remove(model) of that method first: this package applies one method at a time.")
    defaults = default_targets(model)
    if targets is None:
        if defaults is None:
            raise ValueError("No default IA3 targets for this model: pass targets=[...] and feedforward=[...]. "
                             f"Its linear layers are named: {', '.join(linear_module_names(model))}.")
        targets = defaults[0]
    names = lora._resolve_targets(model, targets)  # ValueError naming the model's layers if none match
    if feedforward is None:  # the default feedforward names, where they fall among the chosen layers
        feedforward = [f for f in (defaults[1] if defaults else []) if any(_is_feedforward(n, [f]) for n in names)]
    feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
    unmatched = [f for f in feedforward if not any(_is_feedforward(n, [f]) for n in names)]
    if unmatched:
        raise ValueError(f"feedforward={unmatched!r} matches none of the targeted layers "
                         f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}): feedforward layers "
                         "must be among the targets.")
    # Remember which parameters were trainable, so that remove() can give the model back as it was.
    model._peft_lab_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, IA3Linear(getattr(parent, child), feedforward=_is_feedforward(name, feedforward)))
    mark_only_ia3_as_trainable(model)
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = [targets] if isinstance(targets, str) else list(targets)
    model.peft_lab_info = {
        "method": "ia3", "targets": targets, "feedforward": feedforward, "modules": names,
        "feedforward_modules": [n for n in names if _is_feedforward(n, feedforward)],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model


def _require_ia3(model):
    return contract.require_layers(model, ia3_layers, "IA3")


def merge(model):
    """Fold every scaling vector into its frozen weight (and bias); returns the model.

    Explained in notebook 06_beyond_lora, section 3.
    """
    return contract.each_layer(model, ia3_layers, "IA3", "merge")


def unmerge(model):
    """Undo merge: divide the vectors out again (exact up to float rounding); returns the model."""
    layers = _require_ia3(model)
    zeros = [n for n, layer in layers.items() if layer.merged and (layer.ia3_l == 0).any()]
    if zeros:  # checked for all layers first, so that a refusal leaves every layer as it was
        raise ValueError(f"The IA3 vector of {zeros[0]} holds zeros: merging multiplied those features by 0 "
                         "and dividing cannot bring them back.")
    for layer in layers.values():
        layer.unmerge()
    return model


def remove(model):
    """Put the original layers back and drop the vectors; returns the model.

    The original module objects come back untouched, their weights bit-identical to before apply,
    and every ``requires_grad`` as before apply. A merged model is refused: its weights were changed,
    and unmerging restores them only up to float rounding. Call ``unmerge(model)`` first if that is
    good enough.
    """
    layers = _require_ia3(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} IA3 layers are merged into their base weights ({merged[0]}, ...), so "
            "removing them cannot give the original weights back bit for bit. "
            "Call ia3.unmerge(model) first (the weights then match the originals up to float rounding)."
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

def save(model, folder):
    """Write the vectors as peft does: adapter_config.json (an IA3Config) and adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, folder)`` can read it. Returns the folder as a Path.
    Explained in notebook 06_beyond_lora, section 3.
    """
    from safetensors.torch import save_file

    layers = _require_ia3(model)
    info = model.peft_lab_info
    targets, feedforward = list(info["targets"]), list(info["feedforward"])
    if not set(feedforward) <= set(targets):
        # peft insists that feedforward_modules be a subset of target_modules (as strings). Full
        # module names satisfy it and select exactly the same layers.
        feedforward = list(info["feedforward_modules"])
        targets += feedforward
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": lora._base_name(model),
        "target_modules": targets,
        "feedforward_modules": feedforward,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "init_ia3_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "exclude_modules": None,
    }
    tensors = {}
    for name, layer in layers.items():
        # peft's shapes: (1, in) for input scaling, (out, 1) for output scaling
        vector = layer.ia3_l.detach().cpu()
        vector = vector.view(1, -1) if layer.feedforward else vector.view(-1, 1)
        tensors[f"{KEY_PREFIX}{name}.{VECTOR}"] = vector.contiguous()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(folder)


def _read_config(folder):
    config = contract.read_adapter_config(folder, "IA3")
    if config.get("peft_type") != "IA3":
        raise ValueError(f"{folder!r} holds a {config.get('peft_type')} adapter, not IA3.")
    used = [k for k in ("modules_to_save", "exclude_modules") if config.get(k) not in (None, [], {})]
    if used:
        raise ValueError(f"The adapter in {folder!r} uses peft features this package does not support: "
                         f"{', '.join(used)}.")
    return config


def _config_targets(model, config):
    """(targets, feedforward) for apply from a peft config, a regex string turned into full names."""
    linear = [n for n, _ in lora._linear_modules(model)]
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":  # peft: a single string is a regex
        targets = [n for n in linear if re.fullmatch(targets, n)] or [targets]
    feedforward = config.get("feedforward_modules")
    if isinstance(feedforward, str):  # a regex again: full names match only themselves
        feedforward = [n for n in linear if re.fullmatch(feedforward, n)]
    return targets, feedforward


def load(model, folder):
    """Apply IA3 to `model` as the adapter's config says and load its vectors; returns the model.

    Reads adapters written by ``save`` or by peft's ``save_pretrained``. If the model already has
    IA3 layers, the vectors are loaded into them (the same layers must be feedforward). Raises
    ValueError when the adapter was made for another base model (missing modules, other shapes);
    a failed load leaves a fresh model as it came. Explained in notebook 06_beyond_lora, section 3.
    """
    from safetensors.torch import load_file

    config = _read_config(folder)
    saved_for, ours = config.get("base_model_name_or_path"), lora._base_name(model)
    if saved_for and ours and saved_for != ours:
        warnings.warn(f"The adapter was saved for {saved_for!r}, this model is {ours!r}.")
    applied_here = not ia3_layers(model)
    if applied_here:
        targets, feedforward = _config_targets(model, config)
        try:
            apply(model, targets=targets, feedforward=feedforward)
        except ValueError as e:
            raise ValueError(f"The adapter in {folder!r} does not fit this model (made for another "
                             f"base model?): {e}") from None
    try:
        _load_weights(model, contract.read_weights(os.path.join(folder, WEIGHTS_NAME)))
    except ValueError:
        if applied_here:
            remove(model)  # leave the model as it came
        raise
    return model


def _load_weights(model, state):
    layers = ia3_layers(model)
    vectors = {}
    for key, tensor in state.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        module, _, kind = name.rpartition(".")
        if kind != VECTOR:
            raise ValueError(f"Unexpected key in the adapter file: {key!r}")
        vectors[module] = tensor
    missing, extra = sorted(set(layers) - set(vectors)), sorted(set(vectors) - set(layers))
    if extra:
        raise ValueError(f"The adapter has vectors for modules this model does not have: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (made for another base model?)")
    if missing:
        raise ValueError(f"The adapter has no vectors for these IA3 layers of the model: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (made for another base model?)")
    # Check everything before copying anything: a bad file changes nothing.
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"IA3 layer {name} is merged: call ia3.unmerge(model) before loading.")
        n = layer.ia3_l.numel()
        want = (1, n) if layer.feedforward else (n, 1)
        have = tuple(vectors[name].shape)
        if have == want[::-1] and n > 1:
            raise ValueError(f"At {name} the adapter scales the {'output' if layer.feedforward else 'input'}, "
                             f"this model's IA3 layer the {'input' if layer.feedforward else 'output'}: the "
                             "adapter's feedforward_modules differ from the layers' (apply it with the same).")
        if have not in (want, (n,)):
            raise ValueError(f"Shapes differ at {name}: the adapter's vector has shape {have}, the model's "
                             f"layer needs {want} (made for a base model with another hidden size?)")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.ia3_l.copy_(vectors[name].reshape(-1))
