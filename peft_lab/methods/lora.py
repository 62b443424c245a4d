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
import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from . import base as contract
from . import layer_wrappers as layers


class LoRALinear(layers.WrappedLinear):
    """A frozen linear layer plus a trainable low-rank update: y = base(x) + scaling * B(A(dropout(x))).

    Explained in notebook 02_lora, section 2.
    """
    label = "LoRA"
    over_4bit = True  # LoRA over an NF4 base (nf4.quantize_model) is QLoRA: the base dequantised on the fly

    def __init__(self, base, rank=8, alpha=16, dropout=0.0, init="kaiming", rslora=False):
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        super().__init__(base)  # base frozen; Conv1D noticed (only merging needs to know); fp32 over a half base
        in_f, out_f = self.in_features, self.out_features
        kw = dict(bias=False, device=self.base_device, dtype=self.adapter_dtype)
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
        if not hasattr(self.base, "weight"):
            raise ValueError("This LoRA layer sits on a 4-bit (NF4) base: adding B A into it would mean quantising "
                             "the sum again, which loses most of the update. Keep the adapter unmerged, or merge it "
                             "into the original (unquantised) weights instead.")
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
# Settings: typed, with their peft names
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAConfig:
    """LoRA's settings, checked, with their names in peft's ``LoraConfig`` (``to_peft`` / ``from_peft``)."""
    rank: int = 8
    alpha: float = 16
    targets: object = ("q_proj", "v_proj")
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False

    def __post_init__(self):
        check_rank_and_alpha(self.rank, self.alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def to_peft(self, model, use_dora: bool = False) -> dict:
        """peft's adapter_config.json for these settings on ``model`` (its info gives the recorded targets)."""
        info = model.peft_lab_info
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": layers.base_name(model),
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": info["targets"],
            "use_rslora": self.rslora,
            "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.layers_of(model, LoRALinear).values()),
            "bias": "none",
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "inference_mode": True,
            "use_dora": use_dora,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    @classmethod
    def from_peft(cls, config: dict, model) -> "LoRAConfig":
        """The settings a peft LoraConfig (as a dict) describes, for ``model`` (a regex target becomes names)."""
        return cls(rank=config["r"], alpha=config["lora_alpha"], targets=layers.config_targets(model, config["target_modules"]),
                   dropout=config.get("lora_dropout", 0.0),
                   init="gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming",
                   rslora=config.get("use_rslora", False))

    def apply_args(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": self.targets, "dropout": self.dropout,
                "init": self.init, "rslora": self.rslora}


def check_rank_and_alpha(rank, alpha) -> None:
    """Refuse a rank or alpha that cannot train, with what to choose instead (LoRA and DoRA share it)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a whole number of at least 1 (the inner size of A and B), got {rank!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}: the update is scaled by alpha/rank, so 0 "
                         "trains nothing and a negative alpha flips it. A usual choice is alpha = 2 x rank.")


# ----------------------------------------------------------------------------------------------
# Apply, merge, unmerge, remove
# ----------------------------------------------------------------------------------------------

def lora_layers(model):
    """{full module name: LoRALinear} for every LoRA layer in the model (DoRA's are LoRA layers too)."""
    return layers.layers_of(model, LoRALinear)


@torch.no_grad()
def update_size(model) -> float:
    """The mean Frobenius norm of the learned updates dW = scaling * B A over the model's LoRA layers: how far
    training moved the weights. Under Adam it depends on the rank through the scaling (alpha / r shrinks it as r
    grows, alpha / sqrt(r) keeps it about steady). Explained in notebook 02_lora, section 7."""
    sizes = [float(layer.delta_weight().float().norm()) for layer in lora_layers(model).values()]
    if not sizes:
        raise ValueError("This model has no LoRA layers; apply LoRA (lora.apply) and train it first.")
    return sum(sizes) / len(sizes)


def linear_module_names(model):
    """Sorted short names (last part of the path) of the model's linear layers, e.g. ['c_attn', ...].

    These are the names ``apply(targets=...)`` accepts. Explained in notebook 02_lora, section 1.
    """
    return layers.linear_module_names(model)


def apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, init="kaiming",
          rslora=False, layer_class=None, method="lora"):
    """Wrap the target layers of `model` in LoRALinear and freeze everything else, in place.

    targets: module names matched like peft's `target_modules` list (the name equals a target or
    ends with "." + target), a single name, or "all-linear" (every linear layer but the output head).
    Returns the model, with ``model.peft_lab_info`` describing the adapter. (``layer_class`` and ``method``
    let a LoRA variant, DoRA, reuse this with its own layer.) Explained in notebook 02_lora, section 3.
    """
    config = LoRAConfig(rank, alpha, targets, dropout, init, rslora)
    layers.refuse_a_second_method(model)
    names = layers.resolve_targets(model, targets)  # ValueError naming the model's layers if none match
    layer_class = layer_class or LoRALinear
    layers.wrap(model, names, lambda name, linear: layer_class(linear, rank, alpha, dropout, init, rslora))
    model.peft_lab_info = {
        "method": method, "rank": rank, "alpha": alpha, "targets": layers.targets_as_given(targets, names),
        "dropout": dropout, "init": init, "rslora": rslora, "scaling": config.scaling, "modules": names,
        "trainable_parameters": layers.trainable_count(model),
    }
    return model


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
    return layers.unwrap(model, LoRALinear, "LoRA")


# ----------------------------------------------------------------------------------------------
# Save and load, in the Hugging Face peft layout
# ----------------------------------------------------------------------------------------------

def settings(model) -> LoRAConfig:
    """The typed settings of a LoRA (or DoRA) model, from its ``peft_lab_info``."""
    info = model.peft_lab_info
    return LoRAConfig(info["rank"], info["alpha"], tuple(info["targets"]), info["dropout"], info["init"], info["rslora"])


def tensors(model) -> dict:
    """A and B of every LoRA layer under peft's keys."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[layers.saved_key(name, "lora_A.weight")] = layer.lora_A.weight
        out[layers.saved_key(name, "lora_B.weight")] = layer.lora_B.weight
    return out


def save(model, folder):
    """Write the adapter (A and B only, a few MB at most) as peft does: adapter_config.json and
    adapter_model.safetensors. ``peft.PeftModel.from_pretrained(base, folder)`` can read it.

    Explained in notebook 02_lora, section 6.
    """
    contract.require_layers(model, lora_layers, "LoRA")
    return layers.write_adapter(folder, settings(model).to_peft(model), tensors(model))


# peft features this package does not implement: loading such an adapter would silently differ.
UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
               "layers_to_transform", "exclude_modules", "target_parameters", "trainable_token_indices",
               "layer_replication", "use_qalora", "alora_invocation_tokens", "use_bdlora")


def read_config(folder, label="LoRA", use_dora=False) -> dict:
    """A saved LoRA (or, with ``use_dora``, DoRA) adapter's config, refused when peft wrote another method or a
    feature this package does not implement."""
    config = contract.read_adapter_config(folder, label)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder!r} holds a {config.get('peft_type')} adapter, not {label}.")
    if use_dora and not config.get("use_dora"):
        raise ValueError(f"{folder!r} holds a plain LoRA adapter (use_dora is false): load it with lora.load.")
    layers.refuse_features(config, folder, [k for k in UNSUPPORTED if not (use_dora and k == "use_dora")])
    return config


def load(model, folder):
    """Apply LoRA to `model` as the adapter's config says and load its A and B; returns the model.

    Reads adapters written by ``save`` or by peft's ``save_pretrained``. If the model already has
    LoRA layers, the weights are loaded into them (rank, alpha and targets must agree).
    Raises ValueError when the adapter was made for another base model (missing modules, other
    shapes) or with another rank. Explained in notebook 02_lora, section 6.
    """
    config = LoRAConfig.from_peft(read_config(folder), model)
    return layers.attach_and_load(model, folder, LoRALinear, "LoRA", config.apply_args(), apply, load_weights,
                                  remove, agree=("rank", "alpha", "rslora"))


def load_weights(model, state, label="LoRA"):
    """Copy A and B from a saved state into the model's LoRA layers, every name, rank and shape checked first."""
    found = layers.tensors_by_module(state, ("lora_A.weight", "lora_B.weight"), lora_layers(model), "weights", label)
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"{label} layer {name} is merged: call {label.lower()}.unmerge(model) before loading.")
        A, B = found[name].get("lora_A.weight"), found[name].get("lora_B.weight")
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
        for name, layer in lora_layers(model).items():
            layer.lora_A.weight.copy_(found[name]["lora_A.weight"])
            layer.lora_B.weight.copy_(found[name]["lora_B.weight"])
