"""Freezing choices: which of the model's own parameters are trained.

Explained in notebook 01_full_finetuning_and_freezing, section "Freezing".

The cheapest way to fine-tune less is to train only part of the network and freeze the rest
(``requires_grad = False``: no gradient, no optimizer state for those weights). Each choice below
names a part; ``apply`` leaves exactly that part trainable and prints how much that is.

Works for Llama-family models (``model.model.layers``) and GPT-2 (``model.transformer.h``).
"""
from __future__ import annotations

import re

CHOICES = {
    "full": "every parameter (full fine-tuning)",
    "last_n": "the last N transformer blocks and the final norm",
    "attention": "the attention projections of every block",
    "mlp": "the MLP (feed-forward) layers of every block",
    "norms": "the normalisation layers' scales (and biases)",
    "embeddings": "the token embeddings (and so the output head, where the two are tied)",
    "head": "the output head only (for tied models this is the embedding matrix too)",
}


def blocks(model):
    """The list of transformer blocks, for the architectures the workbook supports."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__}.")


def _block_index(name: str):
    match = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _selected(name: str, choice: str, n: int, n_layers: int) -> bool:
    block = _block_index(name)
    if choice == "full":
        return True
    if choice == "last_n":
        in_last = block is not None and block >= n_layers - n
        final_norm = block is None and ("norm" in name or "ln_f" in name)
        return in_last or final_norm
    if choice == "attention":
        return block is not None and (".self_attn." in name or ".attn." in name)
    if choice == "mlp":
        return block is not None and ".mlp." in name
    if choice == "norms":
        return "norm" in name or ".ln_" in name or name.startswith(("transformer.ln_f", "ln_f"))
    if choice == "embeddings":
        return "embed_tokens" in name or ".wte." in name or ".wpe." in name
    if choice == "head":
        return name.startswith("lm_head")
    raise AssertionError(choice)


def apply(model, choice: str = "full", n: int = 1, verbose: bool = True):
    """Make only the part ``choice`` of ``model`` trainable (in place); return the model.

    ``n`` is the number of blocks for ``"last_n"``. Tied weights (SmolLM2 and GPT-2 share the token
    embedding and the output head) are one tensor: choosing either trains both.
    """
    if choice not in CHOICES:
        raise ValueError(f"Unknown freezing choice {choice!r}. Valid choices: "
                         + "; ".join(f"{k} ({v})" for k, v in CHOICES.items()))
    n_layers = len(blocks(model))
    if choice == "last_n" and not 1 <= n <= n_layers:
        raise ValueError(f"n must be between 1 and {n_layers} (the model's number of blocks), got {n}.")
    for p in model.parameters():
        p.requires_grad_(False)
    # named_parameters(remove_duplicate=False) lists tied tensors under both names, so "head"
    # finds lm_head.weight even when it is the embedding matrix.
    for name, p in model.named_parameters(remove_duplicate=False):
        if _selected(name, choice, n, n_layers):
            p.requires_grad_(True)
    counts = count(model)
    if counts["trainable"] == 0:
        raise ValueError(f"The choice {choice!r} selects no parameter of {type(model).__name__}.")
    model.peft_lab_info = {"method": "full" if choice == "full" else f"freeze:{choice}",
                           "choice": choice, **({"n": n} if choice == "last_n" else {})}
    if verbose:
        print(f"{choice:<11} trains {counts['trainable']:>12,} of {counts['total']:,} parameters "
              f"({100 * counts['trainable'] / counts['total']:.2f} %)")
    return model


def count(model) -> dict:
    """Trainable and total parameters, each shared tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {"trainable": trainable, "total": total}
