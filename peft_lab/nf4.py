"""NF4, QLoRA's 4-bit NormalFloat, from scratch: how a frozen base is stored in about half a byte a weight.

1. **Sixteen levels** from the quantiles of the standard normal distribution, scaled to [-1, 1], with an exact 0
   (8 positive, 7 negative: weights are roughly normal, so each level is used about equally often).
2. **Blockwise absmax scaling:** every block of 64 weights is divided by its largest magnitude, so each value lands
   in [-1, 1]; it is stored as the index (4 bits) of the nearest level, two indices to a byte (first in the high half).
3. **Double quantisation** of the scales: the 64-weight blocks' fp32 absmax values (32/64 = 0.5 bit a weight) are
   centred on their mean and stored in 8 bits each, in blocks of 256 with one fp32 scale each, using bitsandbytes'
   dynamic 8-bit map: 4 + 8/64 + 32/(64 x 256), about 4.127 bits (0.516 bytes) a weight instead of 4.5 (0.5625).

Against bitsandbytes (``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``): the levels, the 4-bit codes,
their packing and the fp32 scales are equal bit for bit, and so is the dequantised weight without double
quantisation. With it, each 8-bit scale code here is the nearest one; bitsandbytes' CPU search picks a farther one
for a few scales in a thousand (never a nearer one), and every block whose scale code agrees dequantises bit for bit.
``tests/test_nf4.py`` checks all of it. Taught in notebook 07_qlora_and_memory, sections 1-3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 64            # weights per absmax scale
STATS_BLOCK = 256     # absmax scales per second-level scale (double quantisation)
NF4_OFFSET = 0.9677083  # the outermost quantile: QLoRA's choice, so the extreme levels are +-1 after scaling


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, sorted: normal quantiles at evenly spaced probabilities, scaled so the largest is 1.

    Positive side: 8 quantiles from ``NF4_OFFSET`` down towards 0.5; negative side: 7; plus an exact zero (a zero
    weight, or padding, must stay zero). The probabilities are float32, the quantiles float64, as bitsandbytes does."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 values in [-1, 1]): a sign, a decimal exponent from 10^-6 to 1 and
    a fraction whose bits shrink as the exponent grows, so small numbers keep their relative precision."""
    data = []
    for i in range(7):  # exponent 10^(i - 6); 2^i fraction steps between 0.1 and 1 at that exponent
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0)
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


_TABLES = {}


def _table(kind: str, device) -> torch.Tensor:
    """``nf4_levels()`` or ``dynamic_map()`` on ``device``, made once: every forward pass of every 4-bit layer
    dequantises with them, and building the dynamic map is a Python loop."""
    key = (kind, torch.device(device))
    if key not in _TABLES:
        table = nf4_levels() if kind == "nf4" else dynamic_map()
        _TABLES[key] = table if key[1].type == "cpu" else table.to(device)
    return _TABLES[key]


def _nearest(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value: which gap between neighbouring levels' midpoints holds it (a
    value exactly on a midpoint goes to the lower level)."""
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2, out_int32=True).to(torch.uint8)


def _blockwise(values: torch.Tensor, block: int, levels: torch.Tensor):
    """(codes, absmax): each block of ``block`` values scaled by its largest magnitude, then the nearest level.
    A last block shorter than ``block`` gets its own scale."""
    flat = values.reshape(-1).float()
    levels = flat.new_tensor(levels.tolist())  # on the weight's device: a weight on a GPU is quantised there
    full = flat.numel() - flat.numel() % block
    pieces = [flat[:full].view(-1, block)] + ([flat[full:].view(1, -1)] if full < flat.numel() else [])
    codes, scales = [], []
    for piece in pieces:
        absmax = piece.abs().amax(dim=1)
        # multiply by the reciprocal (not divide): the same rounding as bitsandbytes
        scaled = (piece * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1)
        codes.append(_nearest(scaled.reshape(-1), levels))
        scales.append(absmax)
    return torch.cat(codes), torch.cat(scales)


def _rescale(codes: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor, block: int) -> torch.Tensor:
    values = levels[codes.long()]
    full = values.numel() - values.numel() % block
    out = torch.empty_like(values)
    out[:full] = (values[:full].view(-1, block) * scales[: full // block].view(-1, 1)).reshape(-1)
    if full < values.numel():
        out[full:] = values[full:] * scales[-1]
    return out


ZERO_CODE = 7  # the index of the level 0.0 (7 negative levels below it)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes a byte, the first in the high half (an odd count is padded with a zero weight's code)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The codes ``pack`` stored, the first ``count`` of them."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:count]


@dataclass
class NF4Tensor:
    """A weight stored in NF4: packed codes, the block scales (8-bit with their own scales and mean when double
    quantised, else fp32) and the shape and dtype to dequantise to."""

    packed: torch.Tensor          # uint8, two codes a byte
    absmax: torch.Tensor          # fp32 per block of 64, or uint8 codes of the dynamic map when double quantised
    shape: tuple
    dtype: torch.dtype
    stats_absmax: torch.Tensor | None = None   # double quantisation: fp32 per block of 256 scales
    offset: float | None = None                # double quantisation: the mean the scales were centred on

    @property
    def nbytes(self) -> int:
        """Bytes this weight takes in memory: codes, scales and second-level scales."""
        parts = [self.packed, self.absmax] + ([self.stats_absmax] if self.stats_absmax is not None else [])
        return sum(t.numel() * t.element_size() for t in parts) + (4 if self.offset is not None else 0)


def quantize(weight: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """``weight`` in NF4, blocks of 64; with ``double_quant`` the block scales are stored in 8 bits too."""
    codes, absmax = _blockwise(weight, BLOCK, nf4_levels())
    if not double_quant:
        return NF4Tensor(pack(codes), absmax, tuple(weight.shape), weight.dtype)
    offset = absmax.mean()
    stats_codes, stats_absmax = _blockwise(absmax - offset, STATS_BLOCK, _table("dynamic", "cpu"))
    return NF4Tensor(pack(codes), stats_codes, tuple(weight.shape), weight.dtype, stats_absmax, float(offset))


def block_scales(q: NF4Tensor) -> torch.Tensor:
    """The fp32 scale of every block of 64, decoded from 8 bits when double quantised."""
    if q.stats_absmax is None:
        return q.absmax
    return _rescale(q.absmax, q.stats_absmax, _table("dynamic", q.absmax.device), STATS_BLOCK) + q.offset


def dequantize(q: NF4Tensor) -> torch.Tensor:
    """The weight NF4 stands for: each code's level times its block's scale, in the original shape and dtype."""
    count = 1
    for n in q.shape:
        count *= n
    codes = unpack(q.packed, count)
    return _rescale(codes, block_scales(q), _table("nf4", codes.device), BLOCK).view(q.shape).to(q.dtype)


# --- a frozen base stored in NF4 (what loading a model "in 4 bits" does) ----------------------------------------

class Linear4bit(torch.nn.Module):
    """A frozen linear layer stored in NF4: each forward pass dequantises the weight (to the input's dtype), uses it
    and lets it go, so only the codes and scales stay in memory. Nothing in it trains."""

    def __init__(self, linear: torch.nn.Linear, double_quant: bool = True):
        super().__init__()
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Linear4bit stores an nn.Linear in NF4, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize(linear.weight.detach(), double_quant)
        self.shape, self.dtype = q.shape, q.dtype
        # buffers: they move with .to(device) and are no parameters, so no optimizer ever sees them
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("stats_absmax", q.stats_absmax)
        self.register_buffer("offset", None if q.offset is None else torch.tensor(q.offset))  # in the state dict too
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def stored(self) -> NF4Tensor:
        offset = None if self.offset is None else float(self.offset)
        return NF4Tensor(self.packed, self.absmax, self.shape, self.dtype, self.stats_absmax, offset)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer stands for (out x in), in the dtype it was stored from."""
        return dequantize(self.stored())

    def forward(self, x):
        return _MatMul4bit.apply(x, self)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4, "
                f"double_quant={self.stats_absmax is not None}")


class _MatMul4bit(torch.autograd.Function):
    """``x W^T + b`` with W dequantised from NF4 for the product and let go at once. Autograd would otherwise keep the
    dequantised W (the size of a bf16 weight) for the backward pass of every 4-bit layer, undoing the memory 4 bits
    saved; here the backward pass dequantises W again, as bitsandbytes does. Nothing in the layer trains, so the
    only gradient is the input's: grad_x = grad_y W."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, layer.dequantized_weight().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantized_weight().to(grad_y.dtype), None


def layers_4bit(model) -> dict:
    """name -> every ``Linear4bit`` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def storage_numbers(model) -> dict:
    """How many weights ``model`` stores in NF4, under the name ``memory.BYTES`` prices them by, e.g.
    ``{"nf4 double-quantised": 106_168_320}`` (empty for a model with no 4-bit layer)."""
    counts = {}
    for layer in layers_4bit(model).values():
        kind = "nf4 double-quantised" if layer.stats_absmax is not None else "nf4"
        counts[kind] = counts.get(kind, 0) + layer.in_features * layer.out_features
    return counts


def storage_bytes_4bit(model) -> int:
    """Bytes the 4-bit layers of ``model`` take: codes, scales, second-level scales (and any bias)."""
    return sum(layer.stored().nbytes + (0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size())
               for layer in layers_4bit(model).values())


def quantize_model(model, double_quant: bool = True, skip=("lm_head",)):
    """Store every linear layer of ``model`` in NF4, in place (layers named in ``skip`` stay as they are: the output
    head shares its weight with the embeddings here). Embeddings and norms keep their dtype, as bitsandbytes does.
    Pass a copy (``models.frozen_copy(base)``): the base itself must not change. Returns the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] not in skip]
    if not names:
        raise ValueError("This model has no nn.Linear layers to store in NF4 (already quantised?).")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit(getattr(parent, child), double_quant))
    for p in model.parameters():
        p.requires_grad_(False)
    model.peft_lab_storage = "nf4" + (" with double quantisation" if double_quant else "")
    return model


def stored_bytes(model) -> int:
    """Bytes a model's weights take in memory: parameters and buffers, each storage counted once."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(seen.values())
