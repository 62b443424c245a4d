"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024), built on this package's LoRA.

Every weight matrix can be split into a *direction* and a *magnitude*: W = m * W / ||W||, where
||W|| holds one norm per output (one per row of W in PyTorch's (out, in) layout) and m is that norm.
DoRA trains the two apart. The direction gets an ordinary LoRA update, the magnitude gets its own
vector m, one trained number per output::

                   frozen        trained (LoRA)
       V  =   [      W      ] + s * [ B ] [ A ]        the new direction, s = alpha / r
              [  out x in   ]       out x r  r x in

                     V                    ||V||  one norm per output row, treated as a constant:
       W' =  m  *  -----                         no gradient flows through it (paper, section 4.3)
                   ||V||
             ^
             one trained number per output, starting at ||W||: with B = 0 at step 0, W' = W

The paper's finding: over training, full fine-tuning's changes of magnitude and of direction are
negatively correlated (a large change of direction comes with a small change of magnitude, and the other
way round), while plain LoRA's are positively correlated: it moves both together. Giving the magnitude its
own parameters lets DoRA show full fine-tuning's negative correlation, for a handful more numbers (out per
layer) than LoRA.

The forward pass never builds W'. Like peft, it reuses the base layer's output W x + b::

    y = W x + b  +  (m / ||V|| - 1) * W x  +  (m / ||V||) * s * B A x   =   W' x + b

With dropout (training only) peft applies it to the LoRA path *and* to the W x inside the
correction term, leaving the base output as it was; this module does exactly the same, so training
runs with peft and with this package agree.

``save`` / ``load`` use peft's layout (a LoRA adapter with ``use_dora: true`` and one
``lora_magnitude_vector`` per layer), so adapters move both ways between this package and
``peft.PeftModel``.

Explained in notebook 06_beyond_lora, section 2.
"""
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import lora
from . import base as contract
from .lora import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, LoRALinear

MAGNITUDE = "lora_magnitude_vector"  # peft's name for m, in its modules and in its saved keys


class DoRALinear(LoRALinear):
    """A frozen linear layer with a DoRA update: y = m * (W + s B A) x / ||W + s B A||_row + b.

    A LoRALinear (same A, B, scaling, dropout, Conv1D handling) plus the magnitude vector
    ``lora_magnitude_vector`` (one number per output feature). Explained in notebook 06_beyond_lora,
    section 2.
    """

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, init="kaiming", rslora=False):
        super().__init__(base, rank, alpha, dropout, init, rslora)
        # m starts as the norm of W + s B A (that is ||W||, as B = 0): the layer starts as the base layer.
        with torch.no_grad():
            norm = self.weight_norm(self._weight_out_in(self.base.weight))
        self.lora_magnitude_vector = nn.Parameter(norm)  # fp32 when the base is half precision, as A, B
        self._merge_norm = None  # ||W + s B A|| of the unmerged weight, kept while merged (unmerge needs it)

    def _weight_out_in(self, weight):
        """The base weight as (out, in), in the adapter's dtype (Conv1D stores it (in, out))."""
        weight = weight.T if self.fan_in_fan_out else weight
        return weight.to(self.lora_A.weight.dtype)

    def weight_norm(self, weight_out_in):
        """||W + s B A|| per output row, shape (out,). B A is detached: the norm gets no gradient."""
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach()
        return torch.linalg.norm(weight_out_in + self.scaling * lora_weight, dim=1)

    def forward(self, x):
        y = self.base(x)
        if self.merged:  # m / ||V|| and B A already live inside the base weight
            return y
        x = x.to(self.lora_A.weight.dtype)
        weight = self._weight_out_in(self.base.weight)
        # The paper (section 4.3) and peft treat ||V|| as a constant: detached, it saves the memory
        # its gradient would need and hardly changes what is learnt.
        scale = self.lora_magnitude_vector / self.weight_norm(weight).detach()
        if self.training and not isinstance(self.dropout, nn.Identity):
            # Dropout on: the correction term needs W x of the *dropped* input, which the base
            # output does not hold, so compute it (bias-free); this is peft's choice too.
            x = self.dropout(x)
            wx = F.linear(x, weight)
        else:
            # No dropout: W x is the base output minus its bias, already computed, no second matmul.
            wx = y if self.base.bias is None else y - self.base.bias
        out = y + (scale - 1) * wx + scale * self.scaling * self.lora_B(self.lora_A(x))
        return out.to(y.dtype)

    def _factor(self, norm):
        """m / ||V|| shaped to scale the base weight's output axis (columns for Conv1D)."""
        factor = (self.lora_magnitude_vector / norm).view(-1, 1)
        return factor.T if self.fan_in_fan_out else factor

    @torch.no_grad()
    def merge(self):
        """W <- m / ||W + dW|| * (W + dW). Explained in notebook 06_beyond_lora, section 2."""
        if self.merged:
            return
        weight = self.base.weight
        # The norm must come from the unmerged weight, as in forward. Once merged, the weight no
        # longer tells ||W + dW||, so keep it for unmerge.
        self._merge_norm = self.weight_norm(self._weight_out_in(weight))
        delta = self.delta_weight()
        weight.copy_((self._factor(self._merge_norm) * (weight + delta)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W' / (m / ||W + dW||) - dW: the inverse of merge, up to float rounding."""
        if not self.merged:
            return
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight / self._factor(self._merge_norm) - delta).to(weight.dtype))
        self._merge_norm = None
        self.merged = False

    def extra_repr(self):
        return "dora, " + super().extra_repr()


# ----------------------------------------------------------------------------------------------
# Apply, merge, unmerge, remove
# ----------------------------------------------------------------------------------------------

def dora_layers(model):
    """{full module name: DoRALinear} for every DoRA layer in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def linear_module_names(model):
    """Sorted short names of the model's linear layers: the names ``apply(targets=...)`` accepts."""
    return lora.linear_module_names(model)


def mark_only_dora_as_trainable(model):
    """Freeze every parameter, then unfreeze A, B and the magnitude of every DoRA layer."""
    lora.mark_only_lora_as_trainable(model)  # DoRALinear is a LoRALinear: this unfreezes A and B
    for layer in dora_layers(model).values():
        layer.lora_magnitude_vector.requires_grad_(True)
    return model


def apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, init="kaiming", rslora=False):
    """Wrap the target layers of `model` in DoRALinear and freeze everything else, in place.

    targets: as in ``lora.apply`` (peft's `target_modules` rule: a name equals a target or ends with
    "." + target; a single name; or "all-linear"). Returns the model, with ``model.peft_lab_info``.
    Explained in notebook 06_beyond_lora, section 2.
    """
    lora.check_rank_and_alpha(rank, alpha)
    existing = lora.lora_layers(model)  # LoRA or DoRA: one low-rank method at a time
    if existing:
        kind = "DoRA" if dora_layers(model) else "LoRA"
        raise ValueError(
            f"This model already has {kind} layers ({', '.join(list(existing)[:4])}, ...). "
            f"Call {kind.lower()}.remove(model) first, or apply once with all the targets you want."
        )
    names = lora._resolve_targets(model, targets)  # ValueError naming the model's layers if none match
    # Remember which parameters were trainable, so that remove() can give the model back as it was.
    model._peft_lab_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, DoRALinear(getattr(parent, child), rank, alpha, dropout, init, rslora))
    mark_only_dora_as_trainable(model)
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    targets = [targets] if isinstance(targets, str) else list(targets)
    layer = next(iter(dora_layers(model).values()))
    # The same keys as LoRA's info (lora.save reads them), the method name aside.
    model.peft_lab_info = {
        "method": "dora", "rank": rank, "alpha": alpha, "targets": targets, "dropout": dropout,
        "init": init, "rslora": rslora, "scaling": layer.scaling, "modules": names,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model


def _require_dora(model):
    return contract.require_layers(model, dora_layers, "DoRA")


def merge(model):
    """Fold each layer's m / ||W + dW|| * (W + dW) into its base weight; returns the model.

    Explained in notebook 06_beyond_lora, section 2.
    """
    return contract.each_layer(model, dora_layers, "DoRA", "merge")


def unmerge(model):
    """Undo merge (exact up to float rounding); returns the model."""
    return contract.each_layer(model, dora_layers, "DoRA", "unmerge")


def remove(model):
    """Put the original layers back and drop the adapter; returns the model.

    The original module objects come back untouched, their weights bit-identical to before apply,
    and every ``requires_grad`` as before apply. A merged model is refused (see ``lora.remove``).
    """
    layers = _require_dora(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} DoRA layers are merged into their base weights ({merged[0]}, ...), so "
            "removing them cannot give the original weights back bit for bit. "
            "Call dora.unmerge(model) first (the weights then match the originals up to float rounding)."
        )
    return lora.remove(model)  # DoRALinear keeps the original module as .base, as LoRALinear does


# ----------------------------------------------------------------------------------------------
# Save and load, in the Hugging Face peft layout
# ----------------------------------------------------------------------------------------------

def save(model, folder):
    """Write the adapter as peft does: LoRA's files with ``use_dora: true`` in adapter_config.json
    and one ``<module>.lora_magnitude_vector`` per layer in adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, folder)`` can read it. Returns the folder as a Path.
    Explained in notebook 06_beyond_lora, section 2.
    """
    from safetensors.torch import load_file, save_file

    layers = _require_dora(model)
    lora.save(model, folder)  # A, B and the LoRA config, in peft's layout; DoRA adds two things to it
    config_path, weights_path = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    with open(config_path) as f:
        config = json.load(f)
    config["use_dora"] = True
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    tensors = load_file(weights_path)
    for name, layer in layers.items():
        tensors[f"{KEY_PREFIX}{name}.{MAGNITUDE}"] = layer.lora_magnitude_vector.detach().cpu().contiguous()
    save_file(tensors, weights_path, metadata={"format": "pt"})
    return Path(folder)


def _read_config(folder):
    config = contract.read_adapter_config(folder, "DoRA")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder!r} holds a {config.get('peft_type')} adapter, not DoRA.")
    if not config.get("use_dora"):
        raise ValueError(f"{folder!r} holds a plain LoRA adapter (use_dora is false): load it with lora.load.")
    # The same peft features as lora.load refuses, bar use_dora itself.
    used = [k for k in lora._UNSUPPORTED if k != "use_dora" and config.get(k) not in (None, False, {}, [])]
    if config.get("bias", "none") != "none":
        used.append("bias")
    if config.get("init_lora_weights", True) not in (True, False, "gaussian"):
        used.append(f"init_lora_weights={config['init_lora_weights']!r} (it also changes the base weights)")
    if used:
        raise ValueError(f"The adapter in {folder!r} uses peft features this package does not support: "
                         f"{', '.join(used)}.")
    return config


def load(model, folder):
    """Apply DoRA to `model` as the adapter's config says and load A, B and m; returns the model.

    Reads adapters written by ``save`` or by peft's ``save_pretrained`` (LoRA with use_dora=True).
    If the model already has DoRA layers, the weights are loaded into them (rank, alpha and rslora
    must agree). Raises ValueError when the adapter was made for another base model (missing
    modules, other shapes) or with another rank; a failed load leaves a fresh model as it came.
    Explained in notebook 06_beyond_lora, section 2.
    """
    if lora.lora_layers(model) and not dora_layers(model):
        raise ValueError("This model has plain LoRA layers: call lora.remove(model) before loading DoRA.")
    return lora.attach_and_load(model, folder, _read_config(folder), "DoRA", apply, dora_layers, _load_weights, remove)


def _load_weights(model, state):
    layers = dora_layers(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"DoRA layer {merged[0]} is merged: call dora.unmerge(model) before loading.")
    suffix = "." + MAGNITUDE
    magnitudes = {}
    for key in [k for k in state if k.endswith(suffix)]:
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        magnitudes[name[: -len(suffix)]] = state.pop(key)
    # Check the magnitudes before lora._load_weights copies A and B in, so that a bad file changes nothing.
    missing, extra = sorted(set(layers) - set(magnitudes)), sorted(set(magnitudes) - set(layers))
    if extra:
        raise ValueError(f"The adapter has magnitudes for modules this model does not have: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (made for another base model?)")
    if missing:
        raise ValueError(f"The adapter has no {MAGNITUDE} for these DoRA layers of the model: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (made for another base model?)")
    for name, layer in layers.items():
        have, want = tuple(magnitudes[name].shape), tuple(layer.lora_magnitude_vector.shape)
        if have != want:
            raise ValueError(f"Shapes differ at {name}: the adapter's magnitude has shape {have}, the model's "
                             f"layer needs {want} (made for a base model with another hidden size?)")
    lora._load_weights(model, state)  # A and B: module names, rank and shapes checked there
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_magnitude_vector.copy_(magnitudes[name])
