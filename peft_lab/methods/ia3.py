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
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import base as contract
from . import layer_wrappers as layers

VECTOR = "ia3_l"  # peft's name for the scaling vector, in its modules and in its saved keys

# (layer names a model must have, default targets, default feedforward targets): the first layout
# whose names the model has gives the defaults of apply(targets=None).
LAYOUTS = (
    (("c_attn", "c_fc", "c_proj"), ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # GPT-2
    (("k_proj", "v_proj", "down_proj"), ["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # Llama-style
)


class IA3Linear(layers.WrappedLinear):
    """A frozen linear layer whose output (or, for a feedforward layer, input) is scaled per feature:
    y = base(x) * l, or y = base(x * l) when ``feedforward``.

    Explained in notebook 06_beyond_lora, section 3.
    """

    label = "IA3"

    def __init__(self, base, feedforward=False):
        super().__init__(base)  # base frozen; Conv1D noticed (merging needs it); fp32 over a half base
        self.feedforward = feedforward
        # Ones: every feature passes unchanged, so the model starts as the base model.
        size = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device, dtype=self.adapter_dtype))

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
    return layers.layers_of(model, IA3Linear)


def linear_module_names(model):
    """Sorted short names of the model's linear layers: the names ``apply(targets=...)`` accepts."""
    return layers.linear_module_names(model)


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


# ----------------------------------------------------------------------------------------------
# Settings: typed, with their peft names
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IA3Config:
    """IA3's settings with their names in peft's ``IA3Config`` (``to_peft`` / ``from_peft``)."""
    targets: object = None
    feedforward: object = None

    def to_peft(self, model) -> dict:
        info = model.peft_lab_info
        targets, feedforward = list(info["targets"]), list(info["feedforward"])
        if not set(feedforward) <= set(targets):
            # peft insists that feedforward_modules be a subset of target_modules (as strings). Full
            # module names satisfy it and select exactly the same layers.
            feedforward = list(info["feedforward_modules"])
            targets += feedforward
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": layers.base_name(model),
            "target_modules": targets,
            "feedforward_modules": feedforward,
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in ia3_layers(model).values()),
            "init_ia3_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "exclude_modules": None,
        }

    @classmethod
    def from_peft(cls, config: dict, model) -> "IA3Config":
        """The settings a peft IA3Config (as a dict) describes, for ``model``: a regex string becomes full names."""
        feedforward = config.get("feedforward_modules")
        if isinstance(feedforward, str):  # a regex again: full names match only themselves
            feedforward = [n for n, _ in layers.linear_modules(model) if re.fullmatch(feedforward, n)]
        return cls(layers.config_targets(model, config.get("target_modules")), feedforward)


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
    layers.refuse_a_second_method(model)
    defaults = default_targets(model)
    if targets is None:
        if defaults is None:
            raise ValueError("No default IA3 targets for this model: pass targets=[...] and feedforward=[...]. "
                             f"Its linear layers are named: {', '.join(linear_module_names(model))}.")
        targets = defaults[0]
    names = layers.resolve_targets(model, targets)  # ValueError naming the model's layers if none match
    if feedforward is None:  # the default feedforward names, where they fall among the chosen layers
        feedforward = [f for f in (defaults[1] if defaults else []) if any(_is_feedforward(n, [f]) for n in names)]
    feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
    unmatched = [f for f in feedforward if not any(_is_feedforward(n, [f]) for n in names)]
    if unmatched:
        raise ValueError(f"feedforward={unmatched!r} matches none of the targeted layers "
                         f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}): feedforward layers "
                         "must be among the targets.")
    layers.wrap(model, names, lambda name, linear: IA3Linear(linear, feedforward=_is_feedforward(name, feedforward)))
    model.peft_lab_info = {
        "method": "ia3", "targets": layers.targets_as_given(targets, names), "feedforward": feedforward,
        "modules": names, "feedforward_modules": [n for n in names if _is_feedforward(n, feedforward)],
        "trainable_parameters": layers.trainable_count(model),
    }
    return model


def merge(model):
    """Fold every scaling vector into its frozen weight (and bias); returns the model.

    Explained in notebook 06_beyond_lora, section 3.
    """
    return contract.each_layer(model, ia3_layers, "IA3", "merge")


def unmerge(model):
    """Undo merge: divide the vectors out again (exact up to float rounding); returns the model."""
    found = contract.require_layers(model, ia3_layers, "IA3")
    zeros = [n for n, layer in found.items() if layer.merged and (layer.ia3_l == 0).any()]
    if zeros:  # checked for all layers first, so that a refusal leaves every layer as it was
        raise ValueError(f"The IA3 vector of {zeros[0]} holds zeros: merging multiplied those features by 0 "
                         "and dividing cannot bring them back.")
    for layer in found.values():
        layer.unmerge()
    return model


def remove(model):
    """Put the original layers back and drop the vectors; returns the model.

    The original module objects come back untouched, their weights bit-identical to before apply,
    and every ``requires_grad`` as before apply. A merged model is refused: its weights were changed,
    and unmerging restores them only up to float rounding. Call ``unmerge(model)`` first if that is
    good enough.
    """
    return layers.unwrap(model, IA3Linear, "IA3")


# ----------------------------------------------------------------------------------------------
# Save and load, in the Hugging Face peft layout
# ----------------------------------------------------------------------------------------------

def save(model, folder):
    """Write the vectors as peft does: adapter_config.json (an IA3Config) and adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, folder)`` can read it. Returns the folder as a Path.
    Explained in notebook 06_beyond_lora, section 3.
    """
    found = contract.require_layers(model, ia3_layers, "IA3")
    tensors = {}
    for name, layer in found.items():
        # peft's shapes: (1, in) for input scaling, (out, 1) for output scaling
        vector = layer.ia3_l.detach()
        tensors[layers.saved_key(name, VECTOR)] = vector.view(1, -1) if layer.feedforward else vector.view(-1, 1)
    return layers.write_adapter(folder, IA3Config().to_peft(model), tensors)


def _read_config(folder):
    config = contract.read_adapter_config(folder, "IA3")
    if config.get("peft_type") != "IA3":
        raise ValueError(f"{folder!r} holds a {config.get('peft_type')} adapter, not IA3.")
    layers.refuse_features(config, folder, ("modules_to_save", "exclude_modules"))
    return config


def load(model, folder):
    """Apply IA3 to `model` as the adapter's config says and load its vectors; returns the model.

    Reads adapters written by ``save`` or by peft's ``save_pretrained``. If the model already has
    IA3 layers, the vectors are loaded into them (the same layers must be feedforward). Raises
    ValueError when the adapter was made for another base model (missing modules, other shapes);
    a failed load leaves a fresh model as it came. Explained in notebook 06_beyond_lora, section 3.
    """
    config = IA3Config.from_peft(_read_config(folder), model)
    return layers.attach_and_load(model, folder, IA3Linear, "IA3",
                                  {"targets": config.targets, "feedforward": config.feedforward}, apply,
                                  load_weights, remove)


def load_weights(model, state):
    """Copy the vectors from a saved state into the model's IA3 layers; everything is checked first."""
    found = ia3_layers(model)
    vectors = layers.tensors_by_module(state, (VECTOR,), found, "vectors", "IA3")
    # Check everything before copying anything: a bad file changes nothing.
    for name, layer in found.items():
        if layer.merged:
            raise ValueError(f"IA3 layer {name} is merged: call ia3.unmerge(model) before loading.")
        n = layer.ia3_l.numel()
        want = (1, n) if layer.feedforward else (n, 1)
        have = tuple(vectors[name][VECTOR].shape)
        if have == want[::-1] and n > 1:
            raise ValueError(f"At {name} the adapter scales the {'output' if layer.feedforward else 'input'}, "
                             f"this model's IA3 layer the {'input' if layer.feedforward else 'output'}: the "
                             "adapter's feedforward_modules differ from the layers' (apply it with the same).")
        if have not in (want, (n,)):
            raise ValueError(f"Shapes differ at {name}: the adapter's vector has shape {have}, the model's "
                             f"layer needs {want} (made for a base model with another hidden size?)")
    with torch.no_grad():
        for name, layer in found.items():
            layer.ia3_l.copy_(vectors[name][VECTOR].reshape(-1))
