"""The shared house of the methods that wrap linear layers: LoRA, DoRA and IA3 (and the next one, a LoRA over a
4-bit base). Explained in notebook 06_beyond_lora, section 1.

Such a method replaces some of the model's linear layers by a wrapper that keeps the original layer (``.base``,
frozen) and adds a few trained numbers::

        model.layers.0.self_attn.q_proj:   nn.Linear   ->   LoRALinear( base = that nn.Linear, frozen,
                                                                        lora_A, lora_B: trained )

Only the wrapper's own maths differs between the methods; everything around it lives here, once:

* ``WrappedLinear``: the base layer frozen, GPT-2's transposed Conv1D noticed, the dtype the trained numbers
  get (fp32 over a half-precision base), and which parameters train;
* finding layers: ``linear_modules``, ``linear_module_names``, ``resolve_targets`` (peft's ``target_modules``
  rule), ``config_targets`` (a regex string in a peft config);
* ``wrap`` / ``unwrap``: swap layers in and out with a snapshot of every ``requires_grad``, so the model comes
  back as it was; a merged model is refused, since its weights cannot come back bit for bit;
* peft's file layout: ``write_adapter``, ``tensors_by_module`` (saved keys to module names, missing and extra
  modules named), ``attach_and_load`` (apply as the config says, or check the layers already there agree; a
  failed load leaves the model as it came).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..nf4 import Linear4bit  # a linear layer stored in 4 bits (QLoRA's base): LoRA can wrap it
from . import base as contract

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # how peft names the wrapped model in its saved keys
LINEAR_TYPES = (nn.Linear, Conv1D)  # Conv1D: GPT-2's linear layer, its weight stored (in, out)


class WrappedLinear(nn.Module):
    """A frozen linear layer (``.base``) with trained numbers of its own; subclasses add the maths.

    ``fan_in_fan_out``: the base is GPT-2's Conv1D, whose weight is stored (in, out). ``adapter_dtype``: the
    dtype of the trained numbers, fp32 over a half-precision base (fine to run, poor to train in).
    """

    label = "wrapped"  # the method's name in messages: "LoRA", "DoRA", "IA3"
    over_4bit = False  # whether the method runs over a base layer stored in NF4 (nf4.Linear4bit): QLoRA is LoRA's

    def __init__(self, base):
        super().__init__()
        if isinstance(base, Linear4bit):
            if not self.over_4bit:
                raise TypeError(f"{self.label} does not run over a 4-bit (NF4) base here: its maths reads the base "
                                "weight itself. Use LoRA (QLoRA), or a base that is not quantised.")
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out, stored_dtype = False, base.dtype
        elif isinstance(base, LINEAR_TYPES):
            self.fan_in_fan_out = isinstance(base, Conv1D)
            self.in_features, self.out_features = base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1]
            stored_dtype = base.weight.dtype
        else:
            raise TypeError(f"{type(self).__name__} wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base = base.requires_grad_(False)  # the original module, kept as is: unwrap gives it back
        self.adapter_dtype = torch.float32 if stored_dtype in (torch.float16, torch.bfloat16) else stored_dtype
        self.merged = False

    @property
    def base_device(self) -> torch.device:
        """Where the base layer's numbers live (its weight, or its 4-bit codes)."""
        return (list(self.base.parameters()) + list(self.base.buffers()))[0].device

    def trained_parameters(self) -> list:
        """The numbers this wrapper trains: every parameter but the base layer's."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]


# --- finding layers ---------------------------------------------------------------------------------

def layers_of(model, kind) -> dict:
    """{full module name: layer} for every layer of class ``kind`` (a WrappedLinear subclass) in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def linear_modules(model) -> list:
    """(full name, module) for every linear layer, wrapped ones included but not their insides."""
    found, skip = [], ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue  # the base and the trained parts inside a wrapper are not layers of the model
        if isinstance(module, WrappedLinear):
            skip = (*skip, name + "." if name else "")  # "" (a bare wrapper): skip all below
            found.append((name, module))
        elif isinstance(module, (*LINEAR_TYPES, Linear4bit)):
            found.append((name, module))
    return found


def linear_module_names(model) -> list:
    """Sorted short names (last part of the path) of the model's linear layers, e.g. ['c_attn', ...]: the
    names ``apply(targets=...)`` accepts. Explained in notebook 02_lora, section 1."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in linear_modules(model) if name})


def matches(name: str, targets) -> bool:
    """peft's rule for a ``target_modules`` list: the full name, or its last dotted parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model, targets) -> list:
    """Full names of the layers ``targets`` selects (a list of names, one name, or 'all-linear')."""
    layers = linear_modules(model)
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # Every linear layer except the output head: the head maps to the vocabulary, and
        # adapting it would mean a huge B (vocab x r) for little gain.
        chosen = [n for n, m in layers if m is not head and n.rsplit(".", 1)[-1] != "lm_head"]
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        chosen = [n for n, _ in layers if matches(n, targets)]
    if not chosen:
        raise ValueError(
            f"No linear layer matches targets={targets!r}. This model's linear layers are named: "
            f"{', '.join(linear_module_names(model))} (or use targets='all-linear')."
        )
    return chosen


def config_targets(model, targets):
    """``target_modules`` of a peft config as ``apply`` takes them: a regex string (peft's rule for a single
    string, 'all-linear' aside) becomes the full names it matches."""
    if isinstance(targets, str) and targets != "all-linear":
        return [n for n, _ in linear_modules(model) if re.fullmatch(targets, n)] or [targets]
    return targets


def targets_as_given(targets, names) -> list:
    """The targets to record in ``peft_lab_info`` (and peft's config): 'all-linear' spelled out as the short
    names it chose, one name as a list."""
    if targets == "all-linear":
        targets = sorted({n.rsplit(".", 1)[-1] for n in names})
    return [targets] if isinstance(targets, str) else list(targets)


# --- wrapping and unwrapping ------------------------------------------------------------------------

def refuse_a_second_method(model) -> None:
    """One layer method at a time: refuse ``apply`` on a model that already has wrapped layers, naming them
    and the way out (the wrapper's ``label`` says which method put them there)."""
    existing = layers_of(model, WrappedLinear)
    if existing:
        label = next(iter(existing.values())).label
        raise ValueError(
            f"This model already has {label} layers ({', '.join(list(existing)[:4])}, ...). "
            f"Call {label.lower()}.remove(model) first, or apply once with all the targets you want."
        )


def wrap(model, names, make_layer) -> dict:
    """Replace each layer in ``names`` by ``make_layer(name, layer)``, in place; freeze everything but the
    wrappers' trained parameters. Every ``requires_grad`` is remembered first, so ``unwrap`` restores them."""
    model._peft_lab_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped[name] = make_layer(name, getattr(parent, child))
        setattr(parent, child, wrapped[name])
    model.requires_grad_(False)
    for layer in wrapped.values():
        for p in layer.trained_parameters():
            p.requires_grad_(True)
    return wrapped


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def require_unmerged(layers: dict, label: str, action: str) -> None:
    """Refuse ``action`` on merged layers: their weights were changed and come back only up to rounding."""
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} {label} layers are merged into their base weights ({merged[0]}, ...), so "
            f"{action} cannot give the original weights back bit for bit. "
            f"Call {label.lower()}.unmerge(model) first (the weights then match the originals up to float rounding)."
        )


def unwrap(model, kind, label: str):
    """Put the original layers back, restore every ``requires_grad`` and drop the method's info; returns the
    model. A merged model is refused (``require_unmerged``)."""
    layers = contract.require_layers(model, lambda m: layers_of(m, kind), label)
    require_unmerged(layers, label, "removing them")
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


# --- peft's file layout ------------------------------------------------------------------------------

def base_name(model):
    """The name the base model was loaded under (peft's ``base_model_name_or_path``), or None."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def write_adapter(folder, config: dict, tensors: dict) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as peft does; returns the folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(folder, WEIGHTS_NAME),
              metadata={"format": "pt"})
    return Path(folder)


def saved_key(module_name: str, part: str) -> str:
    """peft's key of a saved tensor: ``base_model.model.<module>.<part>``."""
    return f"{KEY_PREFIX}{module_name}.{part}"


def tensors_by_module(state: dict, parts, layers: dict, what: str, label: str) -> dict:
    """{module name: {part: tensor}} from a saved state, every key checked: a part not in ``parts`` is an
    unexpected key, and the modules must be exactly the model's ``layers`` (missing and extra ones named)."""
    found = {}
    for key, tensor in state.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        part = next((p for p in parts if name.endswith("." + p)), None)
        if part is None:
            raise ValueError(f"Unexpected key in the adapter file: {key!r}")
        found.setdefault(name[: -len(part) - 1], {})[part] = tensor
    missing, extra = sorted(set(layers) - set(found)), sorted(set(found) - set(layers))
    if extra:
        raise ValueError(f"The adapter has {what} for modules this model does not have: "
                         f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} (made for another base model?)")
    if missing:
        raise ValueError(f"The adapter has no {what} for these {label} layers of the model: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (made for another base model?)")
    return found


def refuse_features(config: dict, folder, unsupported) -> None:
    """Refuse a peft config that uses a feature this package does not implement: loading it would silently
    give another model. ``unsupported``: the config keys that must be empty (None, False, {}, [])."""
    used = [k for k in unsupported if config.get(k) not in (None, False, {}, [])]
    if config.get("bias", "none") != "none":
        used.append("bias")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        used.append(f"init_lora_weights={init!r} (it also changes the base weights)")
    if used:
        raise ValueError(f"The adapter in {folder!r} uses peft features this package does not support: "
                         f"{', '.join(used)}.")


def attach_and_load(model, folder, kind, label: str, settings: dict, apply_fn, load_weights, remove_fn,
                    agree: tuple = ()):
    """The loading steps every layer method shares. ``settings``: ``apply``'s arguments read from the config.

    On a model without the method's layers, apply it with ``settings`` (a ValueError says the adapter does not
    fit this model); on a model that has them, check that the ``agree`` settings match the model's info. Then
    ``load_weights(model, state)``; a failure leaves a model that came without layers as it came.
    """
    config = contract.read_adapter_config(folder, label)  # already checked by the method; read for the base name
    saved_for, ours = config.get("base_model_name_or_path"), base_name(model)
    if saved_for and ours and saved_for != ours:
        warnings.warn(f"The adapter was saved for {saved_for!r}, this model is {ours!r}.")
    applied_here = not layers_of(model, kind)
    if applied_here:
        try:
            apply_fn(model, **settings)
        except ValueError as e:
            raise ValueError(f"The adapter in {folder!r} does not fit this model (made for another "
                             f"base model?): {e}") from None
    elif agree:
        info = model.peft_lab_info
        have, want = tuple(info[k] for k in agree), tuple(settings[k] for k in agree)
        if have != want:
            show = lambda values: ", ".join(f"{k}={v}" for k, v in zip(agree, values))  # noqa: E731
            raise ValueError(
                f"The adapter has {show(want)}, but this model's {label} layers have {show(have)}. Load onto a "
                f"fresh base model (load applies {label} itself) or apply with the same settings."
            )
    try:
        load_weights(model, contract.read_weights(os.path.join(folder, WEIGHTS_NAME)))
    except ValueError:
        if applied_here:
            remove_fn(model)  # leave the model as it came
        raise
    return model
