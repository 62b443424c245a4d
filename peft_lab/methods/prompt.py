r"""Soft prompt tuning (Lester et al. 2021): learn P "virtual token" embeddings, freeze everything else.

The idea in one picture. A normal forward pass looks up one embedding row per token. Prompt tuning
puts P extra vectors in front of those rows; the vectors belong to no word, they are free parameters
and the only thing we train (P x d numbers, e.g. 20 x 576 = 11,520 for SmolLM2-135M)::

    input_ids:                     [ the   film  was   great ]
                                       |     |     |     |       frozen embedding lookup
    inputs_embeds:    [ p1 p2 .. pP | e1    e2    e3    e4   ]   -> frozen transformer -> logits
                        \_________/
                      trainable soft prompt (P x d)

    attention_mask:   [ 1  1  .. 1  | m1    m2    m3    m4   ]   P ones in front
    labels:           [-100 ..  -100| l1    l2    l3    l4   ]   nothing to predict *at* the prompt
    positions:        [ 0  1  .. P-1| P     P+1   P+2   P+3  ]   the prompt reads like text at the start

The model computes logits for all P + T positions; we return only the last T, so the caller sees
logits of shape (batch, T, vocab) exactly as without the prompt and never needs to know it is there.

Generation keeps the prompt at every step because the prompt lives in the key/value cache: the first
step runs [prompt; embeddings(input_ids)] through the model, every later step feeds only the newest
token and attends to the cache, which holds the prompt's keys and values (see ``PromptTuned.generate``).

Explained in notebook 04_prompt_tuning.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

INITS = ("random", "vocab", "text")
RANDOM_INIT_RANGE = 0.5  # uniform in [-0.5, 0.5], the range of Lester et al. 2021 (see _init_prompt)
WEIGHTS_FILE = "prompt.safetensors"
CONFIG_FILE = "prompt_config.json"


class PromptTuned(nn.Module):
    """A frozen causal LM with a trainable soft prompt of ``num_virtual_tokens`` vectors in front.

    Build it with :func:`apply` (or :func:`load`). The only trainable parameter is ``self.prompt``
    (P x d, kept in float32 so that small updates are not lost when the base is fp16/bf16; it is cast
    to the embedding dtype in ``forward``). Explained in notebook 04_prompt_tuning, section 2.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, init: str):
        super().__init__()
        self.model = model
        self.prompt = nn.Parameter(prompt.detach().clone().float())
        self.peft_lab_info = {"method": "prompt", "num_virtual_tokens": prompt.shape[0], "init": init}

    # -- small conveniences so a PromptTuned can stand where a model stood -------------------------
    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    def _prompt_batch(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The soft prompt repeated for every row of the batch: (batch, P, d), in the model's dtype."""
        return self.prompt.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def _check_length(self, total: int) -> None:
        # GPT-2 has a learned table of n_positions position embeddings; past its end the lookup fails
        # with an unhelpful IndexError. Rotary models (Llama) have no table, so no hard limit here.
        limit = getattr(self.model.config, "n_positions", None)
        if limit is not None and total > limit:
            raise ValueError(
                f"{self.num_virtual_tokens} virtual tokens + {total - self.num_virtual_tokens} real tokens = "
                f"{total} positions, but this model has only {limit} position embeddings. Use shorter "
                "inputs (or fewer new tokens) or fewer virtual tokens."
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs):
        """Run the frozen model on [soft prompt; embeddings(input_ids)].

        Returns the base model's output with ``.logits`` of shape (batch, T, vocab) for the T real
        tokens (the P virtual positions are cut off) and ``.loss`` when ``labels`` are given.

        * attention_mask: P ones are put in front (every real token may look at the whole prompt).
          Padding goes on the right; ``None`` means all ones.
        * labels: P values of -100 are put in front and the base model computes the usual shifted
          cross-entropy over all P + T positions. So the *last virtual* position predicts the first
          real token, ``labels[:, 0]`` counts when it is not -100 (as if the prompt were text before
          the input), and nothing is ever predicted at a virtual position.
        * positions: none are passed, so the model numbers all P + T positions 0, 1, ...: virtual
          tokens take 0..P-1, real tokens P..P+T-1. With right padding that is exactly right for the
          real tokens, and it is what the reference implementation in the tests does.

        Other keyword arguments (e.g. ``output_hidden_states=True``) go to the base model; their
        outputs still include the P virtual positions. Explained in notebook 04_prompt_tuning, section 2.
        """
        for name in ("position_ids", "past_key_values", "inputs_embeds"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"PromptTuned.forward does not take {name}: the soft prompt fixes positions 0..P-1 and "
                    "is put in front of the embeddings of input_ids. For generation use tuned.generate(...)."
                )
        batch, T = input_ids.shape
        P = self.num_virtual_tokens
        self._check_length(P + T)

        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([self._prompt_batch(batch, embeds.dtype), embeds], dim=1)

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_mask = attention_mask.new_ones(batch, P)
        attention_mask = torch.cat([prompt_mask, attention_mask], dim=1)

        if labels is not None:
            labels = torch.cat([labels.new_full((batch, P), -100), labels], dim=1)

        out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)
        out.logits = out.logits[:, P:]  # the caller sees logits for its own T tokens only
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 **unsupported) -> torch.Tensor:
        """Greedy or sampled generation with the key/value cache; the soft prompt is active at every step.

        Returns token ids (batch, T + new): the input followed by the new tokens, like HF ``generate``.

        How the prompt stays in: step 1 feeds [prompt; embeddings(input_ids)] (P + T positions) with
        ``use_cache=True``; the cache now holds keys and values for the prompt. Every later step feeds
        only the newest token with that cache, so each new token attends to the prompt as well. No
        step can silently lose the prompt, because it is never fed again and never needs to be.

        Batches: all rows must be real tokens of equal length (no padding), because a pad in the middle
        of a row would sit between the input and its continuation. Generate padded inputs one row at
        a time, or group them by length.

        eos_token_id=None uses the model's ``generation_config.eos_token_id``; pass ``[]`` to never stop
        early. Rows that have finished are filled with ``pad_token_id`` (default: the model's pad id, else
        the first eos id). ``generator`` makes sampling repeatable. Explained in notebook 04_prompt_tuning, section 4.
        """
        if unsupported:
            raise ValueError(
                f"PromptTuned.generate does not support {sorted(unsupported)}; it supports attention_mask, "
                "max_new_tokens, do_sample, temperature, top_k, eos_token_id, pad_token_id and generator."
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        if attention_mask is not None and not bool((attention_mask != 0).all()):
            raise ValueError(
                "PromptTuned.generate needs unpadded inputs (attention_mask all ones): generate padded "
                "inputs one row at a time, or group rows of equal length into a batch."
            )
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature}")

        gen_cfg = getattr(self.model, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(gen_cfg, "eos_token_id", None)
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            pad_token_id = self.model.config.pad_token_id
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0

        batch, T = input_ids.shape
        P = self.num_virtual_tokens
        self._check_length(P + T + max_new_tokens - 1)
        device = input_ids.device
        eos_ids = torch.tensor(eos, device=device, dtype=input_ids.dtype)

        # Step 1: the whole prompt plus the input, positions 0 .. P+T-1, filling the cache.
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([self._prompt_batch(batch, embeds.dtype), embeds], dim=1)
        length = P + T
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
            position_ids=torch.arange(length, device=device).unsqueeze(0).expand(batch, -1),
            use_cache=True,
        )

        tokens = input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            next_token = self._pick(out.logits[:, -1, :].float(), do_sample, temperature, top_k, generator)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if len(eos):
                finished |= torch.isin(next_token, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            # Later steps: only the new token; the prompt is already in out.past_key_values.
            length += 1
            out = self.model(
                input_ids=next_token[:, None],
                past_key_values=out.past_key_values,
                attention_mask=torch.ones(batch, length, dtype=torch.long, device=device),
                position_ids=torch.full((batch, 1), length - 1, device=device),
                use_cache=True,
            )
        return tokens

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
              generator: torch.Generator | None) -> torch.Tensor:
        """Choose the next token from last-position logits (batch, vocab): argmax or a sample."""
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def _init_prompt(model: nn.Module, num_virtual_tokens: int, init: str, init_text: str | None,
                 tokenizer) -> torch.Tensor:
    """The starting values of the soft prompt (P x d). Explained in notebook 04_prompt_tuning, section 3.

    * "random": uniform in [-0.5, 0.5], the range Lester et al. 2021 used. The range sets the size of
      the vectors, and size matters: vectors much longer than the real token embeddings would drown
      out the input at the start of training. A plain ``nn.Embedding`` init (standard normal) gives
      entries about 3.5 times larger (std 1 against 0.29); real embedding entries of small LMs are
      smaller still, so compare the norms (notebook 04, section 3) before blaming a slow start.
    * "vocab": rows of the model's input embedding matrix at P random token ids, so each vector starts
      as a real word (uniform over the whole vocabulary; the paper sampled among the 5,000 most common
      tokens). Uses torch's global random generator: call torch.manual_seed first to repeat it.
    * "text": the embeddings of ``init_text`` tokenised without special tokens, repeated or cut to P,
      so the prompt starts as a human instruction, e.g. "Is this review positive or negative?".
    """
    weight = model.get_input_embeddings().weight
    vocab_size, dim = weight.shape
    if init == "random":
        prompt = torch.empty(num_virtual_tokens, dim, device=weight.device, dtype=torch.float32)
        return prompt.uniform_(-RANDOM_INIT_RANGE, RANDOM_INIT_RANGE)
    if init == "vocab":
        ids = torch.randint(0, vocab_size, (num_virtual_tokens,), device=weight.device)
        return weight.detach()[ids].float().clone()
    if init == "text":
        if tokenizer is None or not init_text:
            raise ValueError('init="text" needs init_text (e.g. "Is this review positive or negative?") and '
                             "the model's tokenizer: apply(model, init='text', init_text=..., tokenizer=tok).")
        ids = text_init_ids(tokenizer, init_text, num_virtual_tokens)
        return weight.detach()[torch.tensor(ids, device=weight.device)].float().clone()
    raise ValueError(f"unknown init {init!r}; choose one of {INITS}")


def text_init_ids(tokenizer, init_text: str, num_virtual_tokens: int) -> list[int]:
    """Token ids of ``init_text`` (no special tokens), repeated or cut to exactly P ids.

    Explained in notebook 04_prompt_tuning, section 3.
    """
    ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init_text {init_text!r} gives no tokens; give a non-empty text.")
    reps = math.ceil(num_virtual_tokens / len(ids))
    return (ids * reps)[:num_virtual_tokens]


def apply(model: nn.Module, num_virtual_tokens: int = 20, init: str = "random",
          init_text: str | None = None, tokenizer=None) -> PromptTuned:
    """Freeze ``model`` and put a trainable soft prompt of ``num_virtual_tokens`` vectors in front.

    ``init`` is "random", "vocab" or "text" (see ``_init_prompt``). Returns a :class:`PromptTuned`
    whose only trainable parameter is the prompt. Explained in notebook 04_prompt_tuning, section 2.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if model.get_input_embeddings() is None:
        raise ValueError("this model has no input embedding layer (get_input_embeddings() is None)")
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = _init_prompt(model, num_virtual_tokens, init, init_text, tokenizer)
    return PromptTuned(model, prompt, init)


@torch.no_grad()
def nearest_tokens(tuned: PromptTuned, tokenizer, k: int = 1) -> list[list[tuple[str, float]]]:
    """For each learned vector, the k vocabulary tokens whose input embeddings are most similar (cosine).

    A way to peek at what the soft prompt "says": right after a text init each vector's nearest token
    is its own word (similarity 1); after training the vectors usually drift away from every word.
    Explained in notebook 04_prompt_tuning, section 5.
    """
    weight = tuned.model.get_input_embeddings().weight.detach().float()
    prompt = tuned.prompt.detach().float().to(weight.device)
    sims = nn.functional.normalize(prompt, dim=-1) @ nn.functional.normalize(weight, dim=-1).T  # (P, V)
    values, ids = sims.topk(min(k, weight.shape[0]), dim=-1)
    return [
        [(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values.tolist(), ids.tolist())
    ]


def _base_description(model: nn.Module) -> dict:
    """What a saved prompt must agree with to be loaded: model type and the shapes that matter."""
    cfg = model.config
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    return {"model_type": cfg.model_type, "hidden_size": hidden, "vocab_size": vocab_size,
            "num_hidden_layers": layers}


def save(tuned: PromptTuned, folder) -> Path:
    """Write only the soft prompt (P x d, safetensors) and a small JSON config into ``folder``.

    Explained in notebook 04_prompt_tuning, section 6.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt": tuned.prompt.detach().cpu().contiguous()}, str(folder / WEIGHTS_FILE))
    config = {**tuned.peft_lab_info, "base": _base_description(tuned.model)}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def load(model: nn.Module, folder) -> PromptTuned:
    """Put a saved soft prompt in front of a (fresh) base ``model``; the base must match the saved one.

    Raises ValueError naming what differs (model type, hidden size, vocabulary, layers, or the prompt's
    shape). Explained in notebook 04_prompt_tuning, section 6.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise ValueError(f"{folder} holds no saved prompt (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("method") != "prompt":
        raise ValueError(f"{folder} holds a {config.get('method')!r} adapter, not a prompt")
    here = _base_description(model)
    differences = [f"{key}: saved {config['base'].get(key)!r}, this model {value!r}"
                   for key, value in here.items() if config["base"].get(key) != value]
    if differences:
        raise ValueError("this prompt was trained on a different base model; " + "; ".join(differences))
    prompt = load_file(str(folder / WEIGHTS_FILE))["prompt"]
    expected = (config["num_virtual_tokens"], here["hidden_size"])
    if tuple(prompt.shape) != expected:
        raise ValueError(f"saved prompt has shape {tuple(prompt.shape)}, expected {expected}")
    for p in model.parameters():
        p.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    return PromptTuned(model, prompt.to(device), config["init"])
