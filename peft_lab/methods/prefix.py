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
cache, every later step appends one token to the same cache (``PrefixTuned.generate``).

Explained in notebook 03_prefix_tuning.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

INITS = ("random", "text")
INIT_STD = 0.02  # random init: small normal keys/values, so the prefix starts close to "nothing to see"
WEIGHTS_FILE = "prefix.safetensors"
CONFIG_FILE = "prefix_config.json"

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
    """Layers, key/value heads and head size of a causal LM, read from its config.

    GPT-2 has as many key/value heads as query heads; Llama-family configs name ``num_key_value_heads``
    (grouped-query attention) and sometimes ``head_dim``. Explained in notebook 03_prefix_tuning, section 1.
    """
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if layers is None or heads is None or hidden is None:
        raise ValueError(f"cannot read layers / heads / hidden size from a {type(cfg).__name__}; "
                         "prefix tuning supports GPT-2 and Llama-family causal LMs")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return {"num_layers": layers, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def _checkpointing_on(model: nn.Module) -> bool:
    # Every transformers model keeps a `gradient_checkpointing` flag on the modules it checkpoints.
    # (`model.is_gradient_checkpointing` still works in 5.x but is deprecated and warns.)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _base_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    w = model.get_input_embeddings().weight
    return w.dtype, w.device


# ---------------------------------------------------------------------------------------------------
# Reparametrisation: a small MLP that produces the prefix while training
# ---------------------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """P ids -> embedding -> Linear -> tanh -> Linear -> all layers' keys and values.

    Li & Liang found that training the prefix directly is unstable, and that producing it with an MLP
    from a smaller embedding trains better. Only the MLP's *output* matters at inference, so after
    training :meth:`PrefixTuned.fold` computes it once and throws the MLP away.
    Explained in notebook 03_prefix_tuning, section 4.
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
class PrefixTuned(nn.Module):
    """A frozen causal LM whose every attention layer sees P extra trainable key/value positions.

    The prefix lives in one tensor of shape (layers, 2, num_kv_heads, P, head_dim) — index 0 of the
    second axis holds keys, 1 values — either as the parameter ``self.prefix`` or, when reparametrised,
    as the output of ``self.encoder`` (a :class:`PrefixEncoder`). Build it with :func:`apply` or
    :func:`load`. Explained in notebook 03_prefix_tuning, section 2.
    """

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, prefix: torch.Tensor | None = None,
                 encoder: PrefixEncoder | None = None, init: str = "random"):
        super().__init__()
        if (prefix is None) == (encoder is None):
            raise ValueError("give exactly one of prefix (a tensor) or encoder (a PrefixEncoder)")
        self.model = model
        geo = _geometry(model)
        self.num_layers, self.num_heads = geo["num_layers"], geo["num_heads"]
        self.num_kv_heads, self.head_dim = geo["num_kv_heads"], geo["head_dim"]
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder = encoder
        if prefix is not None:
            if tuple(prefix.shape) != self.prefix_shape:
                raise ValueError(f"prefix has shape {tuple(prefix.shape)}, this model needs {self.prefix_shape}")
            self.prefix = nn.Parameter(prefix.detach().clone())
        else:
            self.register_parameter("prefix", None)
        self.peft_lab_info = {"method": "prefix", "num_virtual_tokens": num_virtual_tokens,
                              "reparametrize": encoder is not None, "init": init}

    # -- small conveniences so a PrefixTuned can stand where a model stood ------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return _base_dtype_device(self.model)[1]

    @property
    def prefix_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)

    # -- the prefix and the cache that carries it --------------------------------------------------
    def prefix_tensor(self) -> torch.Tensor:
        """The prefix, (layers, 2, num_kv_heads, P, head_dim); produced by the MLP if reparametrised."""
        if self.encoder is None:
            return self.prefix
        flat = self.encoder()  # (P, layers * 2 * kv_heads * head_dim)
        P, L, H, D = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        return flat.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)

    def prefix_cache(self, batch_size: int):
        """A fresh ``DynamicCache`` holding the prefix for every layer, (batch, kv_heads, P, head_dim).

        Fresh on every call because the model *appends* the real tokens' keys/values to the cache
        object it is given. Explained in notebook 03_prefix_tuning, section 2.
        """
        from transformers import DynamicCache

        dtype, _ = _base_dtype_device(self.model)
        prefix = self.prefix_tensor().to(dtype)  # trainable copy may be fp32 while the base is bf16
        # expand: the same prefix for every row of the batch, no copy; DynamicCache's update does a
        # torch.cat, so each row's gradient is summed back into the one prefix.
        layers = [(prefix[l, 0].unsqueeze(0).expand(batch_size, -1, -1, -1),
                   prefix[l, 1].unsqueeze(0).expand(batch_size, -1, -1, -1))
                  for l in range(self.num_layers)]
        return DynamicCache(layers)

    def _check_ready(self, input_ids: torch.Tensor, extra_positions: int = 0) -> None:
        if _checkpointing_on(self.model):
            raise ValueError(CHECKPOINTING_ERROR)
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, seq_len) tensor of token ids")
        # GPT-2 has a learned table of n_positions position embeddings, and the real tokens start at
        # position P: past the table's end the lookup fails with an unhelpful IndexError.
        limit = getattr(self.model.config, "n_positions", None)
        total = self.num_virtual_tokens + input_ids.shape[1] + extra_positions
        if limit is not None and total > limit:
            raise ValueError(f"{self.num_virtual_tokens} prefix positions + {total - self.num_virtual_tokens} "
                             f"tokens = {total} positions, but this model has only {limit} position "
                             "embeddings. Use shorter inputs (or fewer new tokens) or a shorter prefix.")

    # -- forward -----------------------------------------------------------------------------------
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

        Explained in notebook 03_prefix_tuning, section 3.
        """
        self._check_ready(input_ids)
        if "past_key_values" in kwargs or "inputs_embeds" in kwargs:
            raise ValueError("prefix tuning owns the key/value cache and needs input_ids; for "
                             "incremental decoding use tuned.generate(...)")
        batch_size = input_ids.shape[0]
        P = self.num_virtual_tokens
        if attention_mask is not None:
            ones = torch.ones(batch_size, P, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if kwargs.get("position_ids") is not None:  # explicit positions: shift them past the prefix too
            kwargs["position_ids"] = kwargs["position_ids"] + P
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          past_key_values=self.prefix_cache(batch_size), use_cache=True, **kwargs)

    # -- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 **unused) -> torch.Tensor:
        """Greedy or sampled decoding with the key/value cache; the prefix is present at every step.

        Step 0 runs the whole prompt over a fresh prefix cache; every later step feeds only the newest
        token, and the cache (prefix + everything so far) supplies the rest. Returns input ids
        followed by the new ones, like HF ``generate``; rows that produced ``eos_token_id`` continue
        with ``pad_token_id``. Prompts in one batch must be unpadded (same length, mask all ones):
        with right padding the continuation would start after the pads. Pass prompts one at a time
        otherwise. Explained in notebook 03_prefix_tuning, section 5.
        """
        if unused:
            raise ValueError(f"generate() does not support {sorted(unused)}; it takes max_new_tokens, "
                             "do_sample, temperature, top_k, eos_token_id, pad_token_id, generator")
        self._check_ready(input_ids, extra_positions=max_new_tokens)
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("generate() needs unpadded prompts (attention_mask all ones): pass prompts "
                             "of equal length, or one prompt at a time")
        if do_sample and temperature <= 0:
            raise ValueError("temperature must be > 0 when do_sample=True (use do_sample=False for greedy)")
        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(gen_cfg, "pad_token_id", None)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = int(eos[0]) if len(eos) else 0

        ids = input_ids
        cache = self.prefix_cache(ids.shape[0])
        step_input = ids  # step 0: the whole prompt; the model numbers it P..P+T-1 from the cache length
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self.model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[:, -1, :]
            if do_sample:
                logits = logits.float() / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            else:
                next_ids = logits.argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            finished |= torch.isin(next_ids, eos)
            if finished.all():
                break
            step_input = next_ids[:, None]  # the cache now holds prefix + all earlier tokens
        return ids

    # -- reparametrisation -------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> "PrefixTuned":
        """Compute the MLP's prefix once and keep only that tensor; the MLP is dropped.

        Outputs do not change. After folding, the trainable parameter is ``self.prefix``, so build a
        new optimizer if you train further. No-op when not reparametrised.
        Explained in notebook 03_prefix_tuning, section 4.
        """
        if self.encoder is not None:
            prefix = self.prefix_tensor().detach().clone().contiguous()
            self.encoder = None
            self.prefix = nn.Parameter(prefix)
            self.peft_lab_info["folded"] = True
        return self


# ---------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_prefix(model: nn.Module, tokenizer, init_text: str, num_virtual_tokens: int) -> torch.Tensor:
    """The frozen model's own keys/values for ``init_text``, (layers, 2, kv_heads, P, head_dim).

    The text runs once with ``use_cache=True``; its cache holds, for every layer, the keys/values of
    its tokens at positions 0..n-1. Longer texts are cut to the first P positions; shorter ones are
    repeated (tiled) to fill P. When the text has at least P tokens, the untrained prefix-tuned model
    reads any input exactly as the base model reads "first P tokens of init_text + input".
    Explained in notebook 03_prefix_tuning, section 4.
    """
    if tokenizer is None or not init_text:
        raise ValueError('init="text" needs init_text="..." and tokenizer=... (the model\'s tokenizer)')
    _, device = _base_dtype_device(model)
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
# The common face: apply / save / load
# ---------------------------------------------------------------------------------------------------
def apply(model: nn.Module, num_virtual_tokens: int = 10, reparametrize: bool = False, hidden: int = 512,
          init: str = "random", init_text: str | None = None, tokenizer=None) -> PrefixTuned:
    """Freeze ``model`` and give every attention layer P trainable key/value positions.

    reparametrize: produce the prefix with a small MLP of width ``hidden`` while training (call
    ``tuned.fold()`` afterwards). init: "random" (normal, std 0.02) or "text" (the model's own
    keys/values for ``init_text``, see :func:`text_prefix`). Explained in notebook 03_prefix_tuning,
    section 2.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    if _checkpointing_on(model):
        raise ValueError(CHECKPOINTING_ERROR)
    for p in model.parameters():
        p.requires_grad_(False)

    geo = _geometry(model)
    L, H, D, P = geo["num_layers"], geo["num_kv_heads"], geo["head_dim"], num_virtual_tokens
    base_dtype, device = _base_dtype_device(model)
    # trainable numbers stay in fp32 on a half-precision base (small updates would round away);
    # prefix_cache casts them to the base dtype on the way in.
    dtype = torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype

    start = text_prefix(model, tokenizer, init_text, P).to(dtype) if init == "text" else None
    if not reparametrize:
        if start is None:
            start = torch.randn(L, 2, H, P, D, device=device, dtype=dtype) * INIT_STD
        return PrefixTuned(model, P, prefix=start, init=init)

    # The MLP reads a (P, kv_width) embedding: small, and the same width as one layer's keys.
    encoder = PrefixEncoder(P, H * D, hidden, L * 2 * H * D).to(device=device, dtype=dtype)
    if start is not None:
        with torch.no_grad():
            _fit_last_layer(encoder, start.permute(3, 0, 1, 2, 4).reshape(P, -1))
    return PrefixTuned(model, P, encoder=encoder, init=init)


def _base_description(model: nn.Module) -> dict:
    """What a saved prefix must agree with to be loaded: model type and the shapes that matter."""
    geo = _geometry(model)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    return {"model_type": model.config.model_type, "hidden_size": hidden, "vocab_size": vocab_size,
            "num_hidden_layers": geo["num_layers"], "num_key_value_heads": geo["num_kv_heads"],
            "head_dim": geo["head_dim"]}


def save(tuned: PrefixTuned, folder) -> Path:
    """Write only the (folded) prefix, (layers, 2, kv_heads, P, head_dim), and a JSON config.

    A reparametrised prefix is computed once and saved as the plain tensor; the MLP is not saved (the
    ``tuned`` object itself is left as it is). Explained in notebook 03_prefix_tuning, section 6.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        prefix = tuned.prefix_tensor().detach().cpu().contiguous()
    save_file({"prefix": prefix}, str(folder / WEIGHTS_FILE))
    config = {**tuned.peft_lab_info, "base": _base_description(tuned.model)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def load(model: nn.Module, folder) -> PrefixTuned:
    """Apply a saved prefix to a (fresh) base ``model``; the base must match the saved one.

    Raises ValueError naming what differs (model type, hidden size, vocabulary, layers, key/value
    heads, head size, or the prefix's shape). Explained in notebook 03_prefix_tuning, section 6.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise ValueError(f"{folder} holds no saved prefix (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("method") != "prefix":
        raise ValueError(f"{folder} holds a {config.get('method')!r} adapter, not a prefix")
    here = _base_description(model)
    differences = [f"{key}: saved {config['base'].get(key)!r}, this model {value!r}"
                   for key, value in here.items() if config["base"].get(key) != value]
    if differences:
        raise ValueError("this prefix was trained on a different base model; " + "; ".join(differences))
    if _checkpointing_on(model):
        raise ValueError(CHECKPOINTING_ERROR)
    prefix = load_file(str(folder / WEIGHTS_FILE))["prefix"]
    P = config["num_virtual_tokens"]
    expected = (here["num_hidden_layers"], 2, here["num_key_value_heads"], P, here["head_dim"])
    if tuple(prefix.shape) != expected:
        raise ValueError(f"saved prefix has shape {tuple(prefix.shape)}, expected {expected}")
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = PrefixTuned(model, P, prefix=prefix.to(_base_dtype_device(model)[1]), init=config["init"])
    tuned.peft_lab_info.update(reparametrize=config["reparametrize"], folded=config["reparametrize"])
    return tuned


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
    Explained in notebook 03_prefix_tuning, section 3.
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
