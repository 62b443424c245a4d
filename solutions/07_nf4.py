"""Notebook 07, exercise (b): NF4 by hand, its 16 levels and the blockwise quantiser.

Checked by ``exercises.check_nf4_levels`` and ``exercises.check_nf4_quantize``; the package's own versions are
``nf4.nf4_levels`` and ``nf4.quantize(weight, double_quant=False)`` in ``peft_lab/nf4.py``.
"""
import torch


def nf4_levels_mine():
    # 8 normal quantiles on the positive side, 7 on the negative, and an exact 0 (zero weights stay zero);
    # QLoRA's outermost probability 0.9677083 keeps the extreme quantiles finite.
    positive = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return levels / levels.max()  # the largest level is 1, like a weight divided by its block's absmax


def quantize_mine(weight, levels):
    blocks = weight.reshape(-1, 64).float()                    # blocks of 64 consecutive weights
    absmax = blocks.abs().amax(dim=1)                          # one scale per block
    scaled = blocks * (1.0 / absmax).view(-1, 1)               # every value now in [-1, 1]
    midpoints = (levels[:-1] + levels[1:]) / 2
    codes = torch.bucketize(scaled.reshape(-1), midpoints).to(torch.uint8)  # the nearest level's index
    packed = (codes[0::2] << 4) | codes[1::2]                  # two codes a byte, the first in the high half
    return packed, absmax
