"""QLoRA (Dettmers et al. 2023): LoRA trained over a frozen base stored in 4-bit NF4.

The base's linear layers are stored as NF4 codes and block scales (``nf4.quantize_model``, about half a byte a
weight instead of two); each forward pass dequantises a layer's weight, uses it and lets it go (``nf4.Linear4bit``),
and LoRA's A and B train in fp32 beside it, exactly as in ``lora.py``. So QLoRA is LoRA's layer on another base::

    four_bit = nf4.quantize_model(models.frozen_copy(base))   # a copy: the base itself never changes
    tuned = qlora.apply(four_bit, rank=8)

``save`` writes the adapter in peft's LoRA layout (peft saves a QLoRA adapter the same way: A and B only, nothing
of the 4-bit base); ``load`` attaches it to a 4-bit base; ``remove`` gives the 4-bit base back. There is no
``merge``: adding B A into 4-bit codes would mean quantising the sum again. ``merged_copy`` builds the three ways
people merge anyway, so notebook 07 can measure what each costs.

Explained in notebook 07_qlora_and_memory, sections 5, 6 and 8.
"""
from __future__ import annotations

import copy

import torch

from .. import nf4
from . import lora

MERGES = ("original", "dequantized", "requantized")


def _require_4bit(model, action: str) -> dict:
    four_bit = nf4.layers_4bit(model)
    if not four_bit:
        raise ValueError(f"QLoRA {action} a base stored in 4 bits, and this model has no 4-bit layer. Store a copy in "
                         "NF4 first: nf4.quantize_model(models.frozen_copy(base)) (quantising the base itself in place "
                         "would change its weights for good).")
    return four_bit


def _mark(model):
    model.peft_lab_info = {**model.peft_lab_info, "method": "qlora",
                           "base_storage": getattr(model, "peft_lab_storage", "nf4")}
    return model


def apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, init="kaiming", rslora=False):
    """LoRA on ``model``'s target layers, which must be stored in 4 bits (``nf4.quantize_model``); in place.
    The settings are LoRA's (``lora.apply``)."""
    _require_4bit(model, "trains LoRA over")
    return _mark(lora.apply(model, rank, alpha, targets, dropout, init, rslora, method="qlora"))


def save(model, folder):
    """A and B in peft's LoRA layout (``adapter_config.json`` + ``adapter_model.safetensors``), as peft saves a
    QLoRA adapter: the 4-bit base is not in it."""
    return lora.save(model, folder)


def load(model, folder):
    """A saved LoRA adapter attached to ``model``, a base stored in 4 bits."""
    _require_4bit(model, "loads its adapter onto")
    return _mark(lora.load(model, folder))


def remove(model):
    """The 4-bit base back, the adapter dropped (its codes and scales bit-identical to before ``apply``)."""
    return lora.remove(model)


@torch.no_grad()
def merged_copy(tuned, how: str, original=None):
    """A model with the adapter added into its weights, one of three ways (``MERGES``); ``tuned`` is left as it is.

    - ``"original"``: B A added into the *unquantised* base (``original``, the model the 4-bit base was made
      from). Every layer then differs from what the adapter trained with: by the quantisation error.
    - ``"dequantized"``: the 4-bit base dequantised (every layer, as the adapter saw it) and B A added: the trained
      model exactly (up to rounding), but at full size again.
    - ``"requantized"``: the dequantised merge stored in NF4 again: 4-bit size, but the sum is rounded to 16 levels
      per block, and an update far smaller than a level's gap can vanish in it.
    """
    if how not in MERGES:
        raise ValueError(f"how must be one of {', '.join(MERGES)}, got {how!r}")
    if original is None:
        raise ValueError("Pass original=: the unquantised model the 4-bit base was made from (its architecture, "
                         "and for how='original' its weights).")
    layers_4bit, lora_layers = _require_4bit(tuned, "merges"), lora.lora_layers(tuned)
    merged = copy.deepcopy(original).requires_grad_(False)
    for name, layer in layers_4bit.items():
        name = name.removesuffix(".base")           # a wrapped layer keeps its 4-bit base as ``<name>.base``
        target = merged.get_submodule(name)
        weight = target.weight if how == "original" else layer.dequantized_weight().to(target.weight.dtype)
        if name in lora_layers:
            weight = weight + lora_layers[name].delta_weight().to(target.weight.dtype)
        target.weight.copy_(weight)
    if how == "requantized":
        double_quant = any(layer.stats_absmax is not None for layer in layers_4bit.values())
        nf4.quantize_model(merged, double_quant=double_quant)
    return merged
