r"""What prefix tuning and prompt tuning share: P virtual positions in front of the real tokens.

Both methods freeze a causal LM and give it P extra positions that belong to no token; the numbers at
those positions are all they train. They differ in *where* the P positions enter the model::

    prompt tuning (prompt.py)   P vectors in front of the input embeddings: layer 0 reads them, every
                                later layer sees what the frozen model makes of them
    prefix tuning (prefix.py)   P keys and values in front of every attention layer's own, handed to
                                the model as a pre-filled key/value cache

Everything else is the same, and lives here once, in :class:`VirtualTokenModel`:

* the length check: the P virtual positions take P of the model's positions (GPT-2 has a table of
  ``n_positions``; rotary models such as Llama have no hard limit);
* generation (``generate``): step 1 reads the virtual positions and the input and fills the
  key/value cache, the one piece each method writes itself (``first_step``); every later step feeds
  only the newest token, and the cache keeps the virtual positions in view;
* ``remove``: the base model back, every ``requires_grad`` as it was before ``apply``;
* ``save`` / ``load`` in HF peft's layout, so files move both ways between this package and
  ``peft.PeftModel``::

      adapter_config.json         peft_type PREFIX_TUNING or PROMPT_TUNING, num_virtual_tokens, ...
      adapter_model.safetensors   one tensor, "prompt_embeddings", (P, width):
                                    prompt: the soft prompt, width = hidden size
                                    prefix: the folded prefix, width = layers x 2 x kv_width

  peft keeps nothing else; what this package adds (its ``peft_lab_info`` and a description of the base
  model, so that ``load`` can name what differs) rides along in the safetensors header's metadata,
  which peft ignores.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import models
from . import base as contract

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_KEY = "prompt_embeddings"  # peft's name for the one saved tensor, prompt and prefix alike
METADATA_KEY = "peft_lab"          # our own record, in the safetensors header (peft never reads it)


text_config = models.text_config  # the language model's own config (the ground floor reads it)


def base_description(model: nn.Module) -> dict:
    """What a saved prompt or prefix must agree with to be loaded: model type and the shapes that matter."""
    cfg = text_config(model)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    return {"model_type": cfg.model_type, "hidden_size": hidden, "vocab_size": vocab_size,
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None)}


def check_settings(model, num_virtual_tokens, init: str, inits: tuple) -> None:
    """The settings every ``apply`` takes, checked once: a known init, and a P that fits the context."""
    if init not in inits:
        raise ValueError(f"unknown init {init!r}; choose one of {inits}")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    contract.check_context(model, num_virtual_tokens)


class VirtualTokenModel(nn.Module):
    """A frozen causal LM with P virtual positions in front of the real tokens; prompt and prefix build on it.

    A subclass sets ``method`` (its registry name) and ``peft_type`` (HF peft's name), writes its own
    ``forward``, and supplies the small pieces that make it itself: ``first_step`` (how generation
    starts) and, for save/load, ``peft_geometry``, ``saved_width``, ``peft_extras``,
    ``embeddings`` and ``from_embeddings``.
    """

    method = "virtual tokens"
    peft_type = ""

    def __init__(self, model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        # Remember which base parameters were trainable, so that remove() gives the model back as it was;
        # then freeze them all: the virtual positions are the only thing trained.
        self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens

    # -- small conveniences so a tuned model can stand where a model stood -------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> None:
        """Refuse what the model cannot read: anything but (batch, T) ids, or more positions than it has.

        The P virtual positions come first, so the real tokens take positions P..P+T-1, and generating
        N new tokens feeds N-1 of them back (the last one is returned, never read): P + T + N - 1
        positions in all. GPT-2 has a learned table of ``n_positions`` position embeddings, and past
        its end the lookup fails with an unhelpful IndexError; rotary models (Llama) have no table.
        """
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq_len) tensor of token ids")
        limit = getattr(self.model.config, "n_positions", None)
        tokens = input_ids.shape[1] + max(new_tokens - 1, 0)
        total = self.num_virtual_tokens + tokens
        if limit is not None and total > limit:
            raise ValueError(f"{self.num_virtual_tokens} virtual positions ({self.method}) + {tokens} tokens = "
                             f"{total} positions, but this model has only {limit} position embeddings. Use "
                             "shorter inputs (or fewer new tokens) or a smaller num_virtual_tokens.")

    def refuse(self, kwargs: dict, names: tuple, why: str) -> None:
        """Raise for the first of ``names`` given in ``kwargs``: the method sets it itself. (An explicit
        None is taken out of ``kwargs``, so it cannot clash with the method's own value.)"""
        for name in names:
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{type(self).__name__}.forward does not take {name}: {why}")

    def extend_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask over P virtual + T real positions: P ones in front, so every real token sees all P.

        Padding (on the right) stays masked; ``None`` (all ones) stays ``None``.
        """
        if attention_mask is None:
            return None
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    # -- generation ------------------------------------------------------------------------------
    def first_step(self, input_ids: torch.Tensor):
        """Generation, step 1: run the model over the P virtual positions and ``input_ids`` with
        ``use_cache=True``; return its output (``.logits`` ending at the last real token and
        ``.past_key_values`` holding P + T positions). Each method writes its own."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 **unsupported) -> torch.Tensor:
        """Greedy or sampled generation with the key/value cache; the virtual positions count at every step.

        Returns token ids (batch, T + new): the input followed by the new tokens, like HF ``generate``.

        How the virtual positions stay in: step 1 (``first_step``) reads them together with the whole
        input and leaves their keys and values in the cache: a prompt's as the model computes them, a
        prefix's as they are. Every later step feeds only the newest token with that cache, and the
        model numbers it from the cache's length, so each new token attends to the virtual positions
        too. Nothing is fed twice, and nothing can drop out.

        Batches: all rows must be real tokens of equal length (attention_mask all ones, or None),
        because a pad in the middle of a row would sit between the input and its continuation.
        Generate padded inputs one row at a time, or group them by length.

        eos_token_id=None uses the model's ``generation_config`` (then its config); pass ``[]`` to never
        stop early. Rows that have finished are filled with ``pad_token_id`` (default: the model's pad
        id, else the first eos id, else 0). ``generator`` makes sampling repeatable.
        Explained in notebook 03_prefix_tuning, section 4 (check c) and notebook 04_prompt_tuning, section 4.
        """
        if unsupported:
            raise ValueError(f"generate() does not support {sorted(unsupported)}; it takes attention_mask, "
                             "max_new_tokens, do_sample, temperature, top_k, eos_token_id, pad_token_id and generator")
        self.check_input(input_ids, new_tokens=max_new_tokens)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("generate() needs unpadded inputs (attention_mask all ones): generate padded inputs "
                             "one row at a time, or group rows of equal length into a batch")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature} "
                             "(use do_sample=False for greedy)")
        eos, pad_token_id = self._stop_ids(eos_token_id, pad_token_id, input_ids)

        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            if step == 0:  # the virtual positions and the whole input, filling the cache
                out = self.first_step(input_ids)
            else:          # only the newest token; the cache holds everything before it
                out = self.model(input_ids=tokens[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            next_token = self.pick(out.logits[:, -1, :], do_sample, temperature, top_k, generator)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= torch.isin(next_token, eos)
            if bool(finished.all()):
                break
        return tokens

    def _stop_ids(self, eos_token_id, pad_token_id, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The eos ids as a tensor (maybe empty) and the pad id, with the defaults ``generate`` documents."""
        sources = (getattr(self.model, "generation_config", None), self.model.config)
        if eos_token_id is None:
            eos_token_id = next((s.eos_token_id for s in sources if getattr(s, "eos_token_id", None) is not None), [])
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if pad_token_id is None:
            pad_token_id = next((s.pad_token_id for s in sources if getattr(s, "pad_token_id", None) is not None),
                                eos[0] if eos else 0)
        return torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device), int(pad_token_id)

    @staticmethod
    def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
             generator: torch.Generator | None) -> torch.Tensor:
        """Choose the next token from last-position logits (batch, vocab): argmax, or a sample."""
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]

    # -- remove ----------------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """The base model, every ``requires_grad`` as it was before ``apply``; its weights were never changed."""
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(name, p.requires_grad))
        return self.model

    # -- what save and load need from each method ------------------------------------------------
    @staticmethod
    def peft_geometry(model: nn.Module) -> dict:
        """peft's ``num_layers``, ``token_dim`` and ``num_attention_heads`` for this method on ``model``."""
        raise NotImplementedError

    @staticmethod
    def saved_width(geometry: dict) -> int:
        """The width of the saved (P, width) tensor, from ``peft_geometry``."""
        raise NotImplementedError

    def peft_extras(self) -> dict:
        """The method's own entries in adapter_config.json."""
        return {}

    def embeddings(self) -> torch.Tensor:
        """What ``save`` writes as ``prompt_embeddings``: (P, width), as peft lays it out."""
        raise NotImplementedError

    @classmethod
    def from_embeddings(cls, model: nn.Module, embeddings: torch.Tensor, config: dict, info: dict | None):
        """A tuned ``model`` from saved ``embeddings`` (shape already checked), the adapter config and
        ``info``: the saved ``peft_lab_info``, or None for a file peft wrote."""
        raise NotImplementedError

    # -- load ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: nn.Module, folder):
        """Attach a saved adapter of this method to (a fresh) ``model``; files of this package or of peft.

        FileNotFoundError when ``folder`` holds no adapter; ValueError, saying what differs and what to
        do, for another method, another task, another base model, other shapes or a damaged file.
        Explained in notebook 04_prompt_tuning, section 6.
        """
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{folder} holds no saved {cls.method} (expected {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}, as {cls.method}.save or peft's save_pretrained write them)")
        config = _read_config(folder / CONFIG_NAME)
        if config.get("peft_type") != cls.peft_type:
            raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter, not a {cls.method} "
                             f"({cls.peft_type}): load it with the module of its own method")
        if config.get("task_type") not in (None, "CAUSAL_LM") or config.get("num_transformer_submodules", 1) != 1:
            raise ValueError(f"{folder} holds a {config.get('task_type')} adapter; this package loads "
                             "adapters for causal LMs only (task_type CAUSAL_LM, one transformer submodule)")
        tensors, info = _read_weights(folder / WEIGHTS_NAME, cls.method)
        saved_base = (info or {}).get("base")
        if saved_base is None:  # a file peft wrote: no description, but the name it was saved for
            _warn_if_other_name(config, model)
        else:
            _same_base(saved_base, base_description(model), cls.method)
        geometry = cls.peft_geometry(model)
        _same_base({k: config.get(k) for k in geometry}, geometry, cls.method)
        if WEIGHTS_KEY not in tensors:
            raise ValueError(f"{folder / WEIGHTS_NAME} has no tensor {WEIGHTS_KEY!r} (it has {sorted(tensors)}): "
                             f"it is no {cls.method} file; save the {cls.method} again")
        embeddings = tensors[WEIGHTS_KEY]
        expected = (config.get("num_virtual_tokens"), cls.saved_width(geometry))
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"the saved {cls.method} has shape {tuple(embeddings.shape)}, but its config and this "
                             f"model need {expected}: the files do not belong together, or were made for another "
                             f"base model. Save the {cls.method} again from the model it was trained on.")
        if info is not None:
            info = info.get("peft_lab_info")
        return cls.from_embeddings(model, embeddings, config, info)


# ---------------------------------------------------------------------------------------------------
# save / remove: the same for every method (``load`` above is reached as ``PrefixTuned.load`` etc.)
# ---------------------------------------------------------------------------------------------------
def _require(tuned) -> VirtualTokenModel:
    if not isinstance(tuned, VirtualTokenModel):
        raise ValueError(f"expected a prefix- or prompt-tuned model (from prefix.apply / prompt.apply or "
                         f".load), got a {type(tuned).__name__}")
    return tuned


def save(tuned: VirtualTokenModel, folder) -> Path:
    """Write only the trained numbers, in HF peft's layout; returns the folder.

    adapter_config.json says which method and for which shapes; adapter_model.safetensors holds one
    tensor, ``prompt_embeddings`` (P, width): the soft prompt (P, hidden), or the prefix
    (P, layers x 2 x kv_width), folded first when it is reparametrised (peft saves the MLP's output
    too, never the MLP; ``tuned`` itself is left as it is). ``peft.PeftModel.from_pretrained(base,
    folder)`` reads the folder, and ``load`` reads what peft's ``save_pretrained`` writes.
    Explained in notebook 04_prompt_tuning, section 6.
    """
    from safetensors.torch import save_file

    tuned = _require(tuned)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": tuned.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": _name_or_path(tuned.model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": tuned.num_virtual_tokens,
        "num_transformer_submodules": 1,
        **tuned.peft_geometry(tuned.model),
        **tuned.peft_extras(),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    with torch.no_grad():
        embeddings = tuned.embeddings().detach().cpu().contiguous()
    ours = {"peft_lab_info": tuned.peft_lab_info, "base": base_description(tuned.model)}
    save_file({WEIGHTS_KEY: embeddings}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt", METADATA_KEY: json.dumps(ours)})
    return folder


def remove(tuned: VirtualTokenModel) -> nn.Module:
    """The original model back: the same object, its weights bit-identical (they were frozen all along),
    every ``requires_grad`` as it was before ``apply``. The tuned wrapper should not be used afterwards."""
    return _require(tuned).remove()


# ---------------------------------------------------------------------------------------------------
# Reading the two files
# ---------------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); save the adapter again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged (not a JSON object); save the adapter again")
    return config


def _read_weights(path: Path, method: str) -> tuple[dict, dict | None]:
    """The tensors of a safetensors file and our metadata record (None in a file peft wrote)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        info = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    except (SafetensorError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({e}): the file is damaged or cut short. Save the {method} "
                         "again, or copy the folder again from where it was saved.") from None
    return tensors, info


def _same_base(saved: dict, here: dict, method: str) -> None:
    differences = [f"{key}: saved {saved.get(key)!r}, this model {value!r}"
                   for key, value in here.items() if None not in (saved.get(key), value) and saved.get(key) != value]
    if differences:
        raise ValueError(f"this {method} was trained on a different base model; " + "; ".join(differences)
                         + ". Load it onto the base model it was trained on.")


def _name_or_path(model: nn.Module) -> str | None:
    return getattr(model.config, "_name_or_path", None) or None


def _warn_if_other_name(config: dict, model: nn.Module) -> None:
    saved_for, ours = config.get("base_model_name_or_path"), _name_or_path(model)
    if saved_for and ours and saved_for != ours:
        warnings.warn(f"the adapter was saved for {saved_for!r}, this model is {ours!r}", stacklevel=3)
