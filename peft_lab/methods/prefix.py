r"""Prefix tuning (Li & Liang 2021): learn P extra key/value positions in *every* attention layer.

Prompt tuning adds vectors in front of the input embeddings, so only layer 0 sees free parameters and
every later layer sees whatever the frozen model makes of them. Prefix tuning goes one step further:
each layer l gets its own P trainable keys K_l and values V_l, placed in front of the keys and values
that layer computes from the real tokens. The base model stays frozen; the prefix is all we train
(layers x 2 x P x kv_width numbers, e.g. 30 x 2 x 10 x 192 = 115,200 for SmolLM2-135M)::

    one attention layer l, one key/value head, T real tokens, P virtual positions

        keys    [ k'1 .. k'P | k1  k2 ... kT ]    k'  = trainable prefix (this layer's own)
        values  [ v'1 .. v'P | v1  v2 ... vT ]    k,v = frozen projections of the real tokens
                  \________/
                   no token, no query, no output: they can only be *looked at*

        query t  attends to  [ all P prefix slots | real tokens 1..t ]  (causal on the real part)
        out_t = softmax(q_t . [K'; K_{<=t}] / sqrt(d)) @ [V'; V_{<=t}]

How the prefix gets inside attention without touching the model's code: a Hugging Face causal LM
accepts ``past_key_values``, a cache object holding per-layer keys/values of tokens it has "already
seen". We hand it a ``transformers.DynamicCache`` pre-filled with the prefix, shape per layer
(batch, num_kv_heads, P, head_dim). Each attention layer calls ``cache.update(k, v, layer)``, which
concatenates the real tokens' keys/values after the prefix (a ``torch.cat``, so gradients flow back
into the prefix) and attends over the result. Three consequences, all handled below:

* attention_mask: the model expects a mask over *cache + input*, so we put P ones on the left.
* positions: the model reads the cache length P and numbers the real tokens P, P+1, ..., P+T-1
  (see ``PrefixTuned.forward`` for why we keep that).
* grouped-query attention: the cache holds *key/value* heads (fewer than query heads in Llama-style
  GQA), so the prefix has num_kv_heads heads; each prefix head is shared by its group of query heads.

Generation keeps the prefix because the cache keeps it: the first step starts from a fresh prefix
cache, every later step appends one token to the same cache. The decoding loop, the length check,
``remove`` and save/load (HF peft's layout) are shared with prompt tuning in ``virtual_tokens.py``;
this module holds what makes prefix tuning itself.

Explained in notebook 03_prefix_tuning.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import models
from .virtual_tokens import VirtualTokenModel, check_settings, remove, save, text_config  # noqa: F401

INITS = ("random", "text")
INIT_STD = 0.02  # random init: small normal keys/values, so the prefix starts close to "nothing to see"

CHECKPOINTING_ERROR = (
    "prefix tuning cannot run with gradient (activation) checkpointing: under checkpointing the "
    "transformers decoder layers replace `past_key_values` by None, and with it the prefix, without "
    "failing. Turn it off first: model.gradient_checkpointing_disable() (named "
    "activation_checkpointing_disable() in transformers >= 5)."
)


# ---------------------------------------------------------------------------------------------------
# The model's attention geometry
# ---------------------------------------------------------------------------------------------------
def _geometry(model: nn.Module) -> dict:
    """Layers, key/value heads and head size: the shape of the cache a prefix fills (``models.geometry``)."""
    geo = models.geometry(model)
    return {k: geo[k] for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")}


def _checkpointing_on(model: nn.Module) -> bool:
    # Every transformers model keeps a `gradient_checkpointing` flag on the modules it checkpoints.
    # (`model.is_gradient_checkpointing` still works in 5.x but is deprecated and warns.)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# Reparametrisation: a small MLP that produces the prefix while training
# ---------------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """P ids -> embedding -> Linear -> tanh -> Linear -> all layers' keys and values.

    Li & Liang found that training the prefix directly is unstable, and that producing it with an MLP
    from a smaller embedding trains better. Only the MLP's *output* matters at inference, so after
    training :meth:`PrefixTuned.fold` computes it once and throws the MLP away. HF peft's
    ``prefix_projection=True`` is the same network (its ``transform`` is our ``mlp``).
    Explained in notebook 03_prefix_tuning, section 3.
    """

    def __init__(self, num_virtual_tokens: int, embed_dim: int, hidden: int, out_features: int):
        super().__init__()
        self.register_buffer("ids", torch.arange(num_virtual_tokens), persistent=False)
        self.embedding = nn.Embedding(num_virtual_tokens, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_features))

    def hidden_activations(self) -> torch.Tensor:
        """(P, hidden): what the last Linear reads; used to fit it to a given prefix (text init)."""
        return self.mlp[1](self.mlp[0](self.embedding(self.ids)))

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding(self.ids))  # (P, layers * 2 * kv_width)


# ---------------------------------------------------------------------------------------------------
# The wrapped model
# ---------------------------------------------------------------------------------------------------
class PrefixTuned(VirtualTokenModel):
    """A frozen causal LM whose every attention layer sees P extra trainable key/value positions.

    The prefix lives in one tensor of shape (layers, 2, num_kv_heads, P, head_dim) — index 0 of the
    second axis holds keys, 1 values — either as the parameter ``self.prefix`` or, when reparametrised,
    as the output of ``self.encoder`` (a :class:`PrefixEncoder`). Build it with :func:`apply` or
    :func:`load`. Explained in notebook 03_prefix_tuning, section 2.
    """

    method = "prefix"
    peft_type = "PREFIX_TUNING"

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, prefix: torch.Tensor | None = None,
                 encoder: PrefixEncoder | None = None, init: str = "random"):
        if (prefix is None) == (encoder is None):
            raise ValueError("give exactly one of prefix (a tensor) or encoder (a PrefixEncoder)")
        if _checkpointing_on(model):
            raise ValueError(CHECKPOINTING_ERROR)
        super().__init__(model, num_virtual_tokens)
        geo = _geometry(model)
        self.num_layers, self.num_heads = geo["num_layers"], geo["num_heads"]
        self.num_kv_heads, self.head_dim = geo["num_kv_heads"], geo["head_dim"]
        self.encoder = encoder
        self.encoder_hidden_size = None if encoder is None else encoder.mlp[0].out_features  # kept after fold
        if prefix is not None:
            if tuple(prefix.shape) != self.prefix_shape:
                raise ValueError(f"prefix has shape {tuple(prefix.shape)}, this model needs {self.prefix_shape}")
            self.prefix = nn.Parameter(prefix.detach().clone())
        else:
            self.register_parameter("prefix", None)
        self.peft_lab_info = {"method": "prefix", "num_virtual_tokens": num_virtual_tokens,
                              "reparametrize": encoder is not None, "init": init}

    @property
    def prefix_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)

    # -- the prefix and the cache that carries it --------------------------------------------------
    def prefix_tensor(self) -> torch.Tensor:
        """The prefix, (layers, 2, num_kv_heads, P, head_dim); produced by the MLP if reparametrised."""
        if self.encoder is None:
            return self.prefix
        return _unflatten(self.encoder(), self.num_layers, self.num_kv_heads, self.head_dim)

    def prefix_cache(self, batch_size: int):
        """A fresh ``DynamicCache`` holding the prefix for every layer, (batch, kv_heads, P, head_dim).

        Fresh on every call because the model *appends* the real tokens' keys/values to the cache
        object it is given. Explained in notebook 03_prefix_tuning, section 2.
        """
        from transformers import DynamicCache

        dtype = self.model.get_input_embeddings().weight.dtype
        prefix = self.prefix_tensor().to(dtype)  # trainable copy may be fp32 while the base is bf16
        # expand: the same prefix for every row of the batch, no copy; DynamicCache's update does a
        # torch.cat, so each row's gradient is summed back into the one prefix.
        layers = [(prefix[l, 0].unsqueeze(0).expand(batch_size, -1, -1, -1),
                   prefix[l, 1].unsqueeze(0).expand(batch_size, -1, -1, -1))
                  for l in range(self.num_layers)]
        return DynamicCache(layers)

    def check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> None:
        """The shared checks (see ``VirtualTokenModel.check_input``), after refusing checkpointing."""
        if _checkpointing_on(self.model):
            raise ValueError(CHECKPOINTING_ERROR)
        super().check_input(input_ids, new_tokens)

    # -- forward and the first generation step --------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """Run the frozen model with the prefix in every layer; logits/loss for the real tokens only.

        * The cache holds P positions, so the model needs a mask over P + T key positions: P ones go
          on the left (the prefix is always visible; padding stays masked).
        * Positions: given a cache of length P and no ``position_ids``, transformers numbers the real
          tokens P..P+T-1 (Llama rotates queries/keys by those positions, GPT-2 adds those rows of its
          position table). We keep that instead of forcing 0..T-1 because (a) it is what the model
          does by itself with any cache, so generation with a growing cache is consistent with this
          forward without extra bookkeeping; (b) a prefix initialised from a real text then sits
          exactly where that text would sit (``init="text"``); (c) HF peft does the same, so the
          equivalence test compares like with like. A prefix has no position of its own: its keys are
          free parameters, the model never rotates or embeds them again.
        * Padding is on the right, so real tokens keep positions P, P+1, ... regardless of padding.

        Explained in notebook 03_prefix_tuning, section 2.
        """
        self.check_input(input_ids)
        self.refuse(kwargs, ("past_key_values", "inputs_embeds"), "prefix tuning owns the key/value cache "
                    "and needs input_ids; for incremental decoding use tuned.generate(...)")
        if kwargs.get("position_ids") is not None:  # explicit positions: shift them past the prefix too
            kwargs["position_ids"] = kwargs["position_ids"] + self.num_virtual_tokens
        return self.model(input_ids=input_ids, attention_mask=self.extend_mask(attention_mask), labels=labels,
                          past_key_values=self.prefix_cache(input_ids.shape[0]), use_cache=True, **kwargs)

    def first_step(self, input_ids: torch.Tensor):
        """Generation, step 1: the whole input over a fresh prefix cache; the model numbers it P..P+T-1
        from the cache's length, and appends its keys/values behind the prefix's (see ``generate``)."""
        return self.model(input_ids=input_ids, past_key_values=self.prefix_cache(input_ids.shape[0]),
                          use_cache=True)

    # -- reparametrisation -------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> "PrefixTuned":
        """Compute the MLP's prefix once and keep only that tensor; the MLP is dropped.

        Outputs do not change. After folding, the trainable parameter is ``self.prefix``, so build a
        new optimizer if you train further. No-op when not reparametrised.
        Explained in notebook 03_prefix_tuning, section 3 (checked in section 4).
        """
        if self.encoder is not None:
            prefix = self.prefix_tensor().detach().clone().contiguous()
            self.encoder = None
            self.prefix = nn.Parameter(prefix)
            self.peft_lab_info["folded"] = True
        return self

    # -- what save / load need (virtual_tokens.save, VirtualTokenModel.load) --------------------------
    @staticmethod
    def peft_geometry(model: nn.Module) -> dict:
        # peft sizes a prefix by the key/value heads (its fix for grouped-query attention): token_dim is
        # one layer's kv_width and num_attention_heads the key/value head count.
        geo = _geometry(model)
        return {"num_layers": geo["num_layers"], "token_dim": geo["num_kv_heads"] * geo["head_dim"],
                "num_attention_heads": geo["num_kv_heads"]}

    @staticmethod
    def saved_width(geometry: dict) -> int:
        return geometry["num_layers"] * 2 * geometry["token_dim"]

    def peft_extras(self) -> dict:
        # The file always holds the folded prefix; prefix_projection says it came from the MLP.
        kv_width = self.num_kv_heads * self.head_dim
        return {"prefix_projection": self.peft_lab_info["reparametrize"],
                "encoder_hidden_size": self.encoder_hidden_size or kv_width}

    def embeddings(self) -> torch.Tensor:
        """The folded prefix as peft saves it: (P, layers * 2 * kv_heads * head_dim)."""
        return _flatten(self.prefix_tensor())

    @classmethod
    def from_embeddings(cls, model, embeddings, config, info):
        geo, weight = _geometry(model), model.get_input_embeddings().weight
        prefix = _unflatten(embeddings, geo["num_layers"], geo["num_kv_heads"], geo["head_dim"])
        tuned = cls(model, config["num_virtual_tokens"], init=(info or {}).get("init", "random"),
                    prefix=prefix.to(device=weight.device, dtype=_trainable_dtype(weight.dtype)).contiguous())
        # The file holds the folded prefix; prefix_projection says whether an MLP made it.
        reparametrized = bool(config.get("prefix_projection", False))
        tuned.peft_lab_info.update(reparametrize=reparametrized, folded=reparametrized)
        if reparametrized:  # the width of the MLP that made it, so that saving again writes the same config
            tuned.encoder_hidden_size = config.get("encoder_hidden_size")
        return tuned


def _flatten(prefix: torch.Tensor) -> torch.Tensor:
    """(layers, 2, kv_heads, P, head_dim) -> (P, layers * 2 * kv_heads * head_dim): the MLP's and peft's layout."""
    return prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1)


def _unflatten(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`_flatten`: peft reads each row as (layers, 2 [key, value], kv_heads, head_dim)."""
    return flat.reshape(flat.shape[0], num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)


def _trainable_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # trainable numbers stay in fp32 on a half-precision base (small updates would round away);
    # prefix_cache casts them to the base dtype on the way in.
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


# ---------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_prefix(model: nn.Module, tokenizer, init_text: str, num_virtual_tokens: int) -> torch.Tensor:
    """The frozen model's own keys/values for ``init_text``, (layers, 2, kv_heads, P, head_dim).

    The text runs once with ``use_cache=True``; its cache holds, for every layer, the keys/values of
    its tokens at positions 0..n-1. Longer texts are cut to the first P positions; shorter ones are
    repeated (tiled) to fill P. When the text has at least P tokens, the untrained prefix-tuned model
    reads any input exactly as the base model reads "first P tokens of init_text + input": notebook
    03_prefix_tuning checks that on ``apply(..., init="text")`` in section 4 (a).
    """
    if tokenizer is None or not init_text:
        raise ValueError('init="text" needs init_text="..." and tokenizer=... (the model\'s tokenizer)')
    device = model.get_input_embeddings().weight.device
    ids = tokenizer(init_text, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ValueError(f"init_text {init_text!r} produced no tokens")
    if ids.shape[1] != num_virtual_tokens:
        # Allowed (the panel lets readers try it), but it starts worse: say so instead of failing quietly.
        how = "repeated to fill" if ids.shape[1] < num_virtual_tokens else "cut to"
        warnings.warn(f"init_text has {ids.shape[1]} tokens and the prefix {num_virtual_tokens} slots: the text is {how} "
                      f"{num_virtual_tokens} positions and reads like garbled text. For the best start use "
                      f"num_virtual_tokens={ids.shape[1]}, or a text of exactly P tokens.", stacklevel=3)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, H, n, D)
    kv = torch.stack(layers)  # (layers, 2, kv_heads, n, head_dim)
    pick = torch.arange(num_virtual_tokens, device=device) % kv.shape[3]  # cut, or repeat when too short
    return kv[:, :, :, pick, :]


def _fit_last_layer(encoder: PrefixEncoder, target_flat: torch.Tensor) -> None:
    """Set the encoder's last Linear so that the MLP outputs ``target_flat`` (P, out) at the start.

    With hidden >= P the P hidden activation rows are (almost surely) independent, and the least-squares
    solution through the pseudo-inverse reproduces the target exactly.
    """
    h = encoder.hidden_activations().double()  # (P, hidden)
    weight = (torch.linalg.pinv(h) @ target_flat.double()).T  # (out, hidden)
    last = encoder.mlp[2]
    last.weight.copy_(weight.to(last.weight.dtype))
    last.bias.zero_()


# ---------------------------------------------------------------------------------------------------
# The common face: apply / load (save and remove come from virtual_tokens)
# ---------------------------------------------------------------------------------------------------
def apply(model: nn.Module, num_virtual_tokens: int = 10, reparametrize: bool = False, hidden: int = 512,
          init: str = "random", init_text: str | None = None, tokenizer=None) -> PrefixTuned:
    """Freeze ``model`` and give every attention layer P trainable key/value positions.

    reparametrize: produce the prefix with a small MLP of width ``hidden`` while training (call
    ``tuned.fold()`` afterwards). init: "random" (normal, std 0.02) or "text" (the model's own
    keys/values for ``init_text``, see :func:`text_prefix`).
    Explained in notebook 03_prefix_tuning, section 1 (the text init in section 4, the MLP in section 3).
    """
    check_settings(model, num_virtual_tokens, init, INITS)
    if _checkpointing_on(model):
        raise ValueError(CHECKPOINTING_ERROR)
    geo = _geometry(model)
    L, H, D, P = geo["num_layers"], geo["num_kv_heads"], geo["head_dim"], num_virtual_tokens
    weight = model.get_input_embeddings().weight
    dtype, device = _trainable_dtype(weight.dtype), weight.device

    start = text_prefix(model, tokenizer, init_text, P).to(dtype) if init == "text" else None
    if not reparametrize:
        if start is None:
            start = torch.randn(L, 2, H, P, D, device=device, dtype=dtype) * INIT_STD
        return PrefixTuned(model, P, prefix=start, init=init)

    # The MLP reads a (P, kv_width) embedding: small, and the same width as one layer's keys.
    encoder = PrefixEncoder(P, H * D, hidden, L * 2 * H * D).to(device=device, dtype=dtype)
    if start is not None:
        with torch.no_grad():
            _fit_last_layer(encoder, _flatten(start))
    return PrefixTuned(model, P, encoder=encoder, init=init)


def load(model: nn.Module, folder) -> PrefixTuned:
    """Attach a saved prefix to a (fresh) base ``model``: from :func:`save` or peft's ``save_pretrained``.

    The file holds the folded prefix, so a reparametrised one comes back folded (``peft_lab_info``
    says ``folded``). FileNotFoundError for an empty folder; ValueError naming what differs (another
    method, model type, hidden size, vocabulary, layers, key/value heads, the prefix's shape) or a
    damaged file. Saving is shown in notebook 04_prompt_tuning, section 6 (a prompt; a prefix works
    the same way).
    """
    return PrefixTuned.load(model, folder)


# ---------------------------------------------------------------------------------------------------
# Helpers for the notebook
# ---------------------------------------------------------------------------------------------------
def prefix_shapes(tuned: PrefixTuned, batch_size: int = 1) -> list[dict]:
    """One row per layer: the key and value tensor shapes that go into that layer's cache.

    (batch, num_kv_heads, P, head_dim) — the *key/value* head count, which is smaller than the query
    head count under grouped-query attention. Explained in notebook 03_prefix_tuning, section 1.
    """
    cache = tuned.prefix_cache(batch_size)
    return [{"layer": i, "keys": tuple(layer.keys.shape), "values": tuple(layer.values.shape),
             "query_heads": tuned.num_heads, "kv_heads": tuned.num_kv_heads}
            for i, layer in enumerate(cache.layers)]


def count_prefix_parameters(tuned: PrefixTuned) -> int:
    """Numbers in the folded prefix: layers x 2 x P x kv_heads x head_dim (what save() writes)."""
    return math.prod(tuned.prefix_shape)


@torch.no_grad()
def attention_weights(tuned: PrefixTuned, input_ids: torch.Tensor, layer: int = 0, head: int = 0) -> torch.Tensor:
    """Attention probabilities of one query head in one layer, (T, P + T), for the first row of the batch.

    Columns 0..P-1 are the prefix slots, P..P+T-1 the real tokens; ``w[:, :P].sum(-1)`` is how much
    of each token's attention goes to the prefix. Query head ``head`` reads prefix key/value head
    ``head // (num_heads // num_kv_heads)`` under grouped-query attention. The fast attention kernels
    do not return weights, so the model switches to its plain ("eager") attention for this one call.
    Explained in notebook 03_prefix_tuning, section 5.
    """
    if not 0 <= layer < tuned.num_layers or not 0 <= head < tuned.num_heads:
        raise ValueError(f"layer must be in 0..{tuned.num_layers - 1} and head in 0..{tuned.num_heads - 1}")
    model = tuned.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = tuned(input_ids=input_ids[:1], output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return out.attentions[layer][0, head].float().cpu()
