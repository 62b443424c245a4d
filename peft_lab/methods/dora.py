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
import torch
import torch.nn.functional as F
from torch import nn

from . import base as contract
from . import layer_wrappers as layers
from . import lora
from .lora import LoRALinear

MAGNITUDE = "lora_magnitude_vector"  # peft's name for m, in its modules and in its saved keys


class DoRALinear(LoRALinear):
    """A frozen linear layer with a DoRA update: y = m * (W + s B A) x / ||W + s B A||_row + b.

    A LoRALinear (same A, B, scaling, dropout, Conv1D handling) plus the magnitude vector
    ``lora_magnitude_vector`` (one number per output feature). Explained in notebook 06_beyond_lora,
    section 2.
    """
    over_4bit = False  # DoRA reads the base weight (its norms): not over a 4-bit base
    label = "DoRA"

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
    return layers.layers_of(model, DoRALinear)


def linear_module_names(model):
    """Sorted short names of the model's linear layers: the names ``apply(targets=...)`` accepts."""
    return layers.linear_module_names(model)


def apply(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, init="kaiming", rslora=False):
    """Wrap the target layers of `model` in DoRALinear and freeze everything else, in place.

    targets: as in ``lora.apply`` (peft's `target_modules` rule: a name equals a target or ends with
    "." + target; a single name; or "all-linear"). Returns the model, with ``model.peft_lab_info``.
    Explained in notebook 06_beyond_lora, section 2.
    """
    return lora.apply(model, rank, alpha, targets, dropout, init, rslora, layer_class=DoRALinear, method="dora")


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
    return layers.unwrap(model, DoRALinear, "DoRA")


# ----------------------------------------------------------------------------------------------
# Save and load, in the Hugging Face peft layout
# ----------------------------------------------------------------------------------------------

def save(model, folder):
    """Write the adapter as peft does: LoRA's files with ``use_dora: true`` in adapter_config.json
    and one ``<module>.lora_magnitude_vector`` per layer in adapter_model.safetensors.

    ``peft.PeftModel.from_pretrained(base, folder)`` can read it. Returns the folder as a Path.
    Explained in notebook 06_beyond_lora, section 2.
    """
    found = contract.require_layers(model, dora_layers, "DoRA")
    tensors = lora.tensors(model)  # A and B, as LoRA saves them
    for name, layer in found.items():
        tensors[layers.saved_key(name, MAGNITUDE)] = layer.lora_magnitude_vector
    return layers.write_adapter(folder, lora.settings(model).to_peft(model, use_dora=True), tensors)


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
    config = lora.LoRAConfig.from_peft(lora.read_config(folder, "DoRA", use_dora=True), model)
    return layers.attach_and_load(model, folder, DoRALinear, "DoRA", config.apply_args(), apply, load_weights,
                                  remove, agree=("rank", "alpha", "rslora"))


def load_weights(model, state):
    """Copy A, B and the magnitudes from a saved state; everything is checked before anything is copied."""
    found = dora_layers(model)
    merged = [n for n, layer in found.items() if layer.merged]
    if merged:
        raise ValueError(f"DoRA layer {merged[0]} is merged: call dora.unmerge(model) before loading.")
    magnitude_keys = {k: state.pop(k) for k in [k for k in state if k.endswith("." + MAGNITUDE)]}
    magnitudes = layers.tensors_by_module(magnitude_keys, (MAGNITUDE,), found, "magnitudes", "DoRA")
    for name, layer in found.items():
        have, want = tuple(magnitudes[name][MAGNITUDE].shape), tuple(layer.lora_magnitude_vector.shape)
        if have != want:
            raise ValueError(f"Shapes differ at {name}: the adapter's magnitude has shape {have}, the model's "
                             f"layer needs {want} (made for a base model with another hidden size?)")
    lora.load_weights(model, state, label="DoRA")  # A and B: module names, rank and shapes checked there
    with torch.no_grad():
        for name, layer in found.items():
            layer.lora_magnitude_vector.copy_(magnitudes[name][MAGNITUDE])
