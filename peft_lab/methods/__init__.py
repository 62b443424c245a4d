"""The PEFT methods, each behind the contract written down in ``base.py``, found through a registry.

    from peft_lab import methods
    tuned = methods.get("lora").apply(model, rank=8)     # or: from peft_lab import lora; lora.apply(...)

A new method is one module here and one line in ``REGISTRY``; the conformance test
(tests/test_method_contract.py) then runs it through apply -> step -> save/load -> remove at once.
"""
from __future__ import annotations

import importlib

# name -> module (in this folder) that implements the contract of base.py
REGISTRY = {
    "lora": "lora",
    "prefix": "prefix",
    "prompt": "prompt",
    "dora": "dora",
    "ia3": "ia3",
    "qlora": "qlora",
}


def names() -> list:
    return list(REGISTRY)


def get(name: str):
    """The module implementing method ``name``, e.g. ``get("lora").apply(model, rank=8)``."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(REGISTRY)}.")
    return importlib.import_module(f"{__name__}.{REGISTRY[name]}")


def apply(name: str, model, **settings):
    """``get(name).apply(model, **settings)``."""
    return get(name).apply(model, **settings)
