"""The method contract: what every PEFT method module offers, and what every tuned model it makes offers.

Explained in notebook 06_beyond_lora, section 1. tests/test_method_contract.py checks it for every
method in ``methods.REGISTRY``: a new method gets the check for free.

A method module (``lora.py``, ``prefix.py``, ...) offers

    apply(model, **settings) -> tuned     attach the method; the base model's weights become frozen
    save(tuned, folder) -> Path           the trained numbers only, in HF peft's layout where peft has
                                          the method (adapter_config.json + adapter_model.safetensors)
    load(model, folder) -> tuned          the saved method attached to ``model``; FileNotFoundError when
                                          the folder holds nothing, ValueError for another method,
                                          another base, other shapes or a damaged file
    remove(tuned) -> model                the original model back: weights bit-identical, every
                                          ``requires_grad`` as it was before ``apply``
    merge / unmerge / fold (optional)     fold the update into the base weights and take it out again

A tuned model

    * is called like the base model and returns ``.logits`` for the *real* tokens only
      (``(batch, tokens, vocab)``), whatever virtual positions the method adds;
    * has ``generate(input_ids, max_new_tokens=..., ...)`` returning prompt + new ids;
    * carries ``peft_lab_info``: a dict with ``"method"`` (its registry name) and its settings;
    * trains exactly what has ``requires_grad`` (``train.fit`` optimises those and nothing else);
    * never changes the base weights, in training or in measuring (``remove`` shows it).

``train.fit``, ``measure`` and the panels rely on these points and on nothing else.
"""
from __future__ import annotations

REQUIRED = ("apply", "save", "load", "remove")
OPTIONAL = ("merge", "unmerge", "fold")


def missing_functions(module) -> list:
    """The contract functions ``module`` does not define (empty when it conforms)."""
    return [name for name in REQUIRED if not callable(getattr(module, name, None))]


def info(tuned) -> dict:
    """The ``peft_lab_info`` of a tuned model (method name and settings), or {} for a plain model."""
    return dict(getattr(tuned, "peft_lab_info", None) or {})


def require_layers(model, find_layers, method: str) -> dict:
    """``find_layers(model)`` (name -> layer), or a clear error when the method was never applied."""
    layers = find_layers(model)
    if not layers:
        raise ValueError(f"This model has no {method} layers: call {method.lower()}.apply(model, ...) first.")
    return layers


def each_layer(model, find_layers, method: str, action: str):
    """Call ``action`` ("merge", "unmerge") on every layer of the method; returns the model."""
    for layer in require_layers(model, find_layers, method).values():
        getattr(layer, action)()
    return model


def read_weights(path) -> dict:
    """The tensors of a saved adapter file; a damaged or truncated file is a ValueError that says what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, EOFError) as err:
        if not __import__("os").path.exists(path):
            raise FileNotFoundError(f"No weights file {path}: is this a saved adapter folder?") from None
        raise ValueError(f"The weights file {path} is damaged or truncated ({err}); save the adapter again.") from None


def check_context(model, num_virtual_tokens: int) -> None:
    """Virtual positions take room in the model's context: refuse a P that leaves none for the text."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if context is not None and num_virtual_tokens >= context:
        raise ValueError(f"num_virtual_tokens={num_virtual_tokens} fills the model's whole context of {context} "
                         f"positions, leaving none for the text; use far fewer (tens, not hundreds).")


def read_adapter_config(folder, method: str) -> dict:
    """A saved adapter's ``adapter_config.json`` as a dict, with clear errors: no such file (is this a saved
    ``method`` adapter?), or a file that is not a JSON object (damaged: save the adapter again)."""
    import json
    from pathlib import Path

    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No adapter_config.json in {str(folder)!r}: is this a saved {method} adapter?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}): it is not readable JSON. Save the adapter again.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged: it holds a JSON {type(config).__name__}, not a config. Save the adapter again.")
    return config
