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
step runs [prompt; embeddings(input_ids)] through the model (``PromptTuned.first_step``), every later
step feeds only the newest token and attends to the cache, which holds the prompt's keys and values
(see ``PromptTuned.generate``). The decoding loop, the length check, ``remove`` and save/load (HF
peft's layout) are shared with prefix tuning in ``virtual_tokens.py``; this module holds what makes
prompt tuning itself.

Explained in notebook 04_prompt_tuning.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .virtual_tokens import VirtualTokenModel, check_settings, remove, save, text_config  # noqa: F401

INITS = ("random", "vocab", "text")
RANDOM_INIT_RANGE = 0.5  # uniform in [-0.5, 0.5], the range of Lester et al. 2021 (see _init_prompt)
# peft's prompt_tuning_init for ours. peft uses it only to start a prompt it trains from scratch, and the
# saved numbers replace whatever it draws. A text init is written as RANDOM: peft's TEXT would need the
# tokenizer's name and the text again. Our own init is kept in the file's metadata.
PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "RANDOM"}
FROM_PEFT_INITS = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


class PromptTuned(VirtualTokenModel):
    """A frozen causal LM with a trainable soft prompt of ``num_virtual_tokens`` vectors in front.

    Build it with :func:`apply` (or :func:`load`). The only trainable parameter is ``self.prompt``
    (P x d, kept in float32 so that small updates are not lost when the base is fp16/bf16; it is cast
    to the embedding dtype in ``forward``). Explained in notebook 04_prompt_tuning, section 2.
    """

    method = "prompt"
    peft_type = "PROMPT_TUNING"

    def __init__(self, model: nn.Module, prompt: torch.Tensor, init: str):
        super().__init__(model, prompt.shape[0])
        self.prompt = nn.Parameter(prompt.detach().clone().float())
        self.peft_lab_info = {"method": "prompt", "num_virtual_tokens": prompt.shape[0], "init": init}

    def embed_with_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[soft prompt; embeddings(input_ids)]: (batch, P + T, d), the prompt in the embeddings' dtype."""
        embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return torch.cat([prompt, embeds], dim=1)

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
        self.refuse(kwargs, ("position_ids", "past_key_values", "inputs_embeds"), "the soft prompt fixes "
                    "positions 0..P-1 and is put in front of the embeddings of input_ids. For generation use "
                    "tuned.generate(...).")
        self.check_input(input_ids)
        P = self.num_virtual_tokens
        if labels is not None:
            labels = torch.cat([labels.new_full((labels.shape[0], P), -100), labels], dim=1)
        keep = kwargs.get("logits_to_keep", 0)
        if torch.is_tensor(keep):  # positions of the real tokens (train.label_logits): they sit P further on
            kwargs["logits_to_keep"] = keep + P
        out = self.model(inputs_embeds=self.embed_with_prompt(input_ids),
                         attention_mask=self.extend_mask(attention_mask), labels=labels, **kwargs)
        if not torch.is_tensor(keep) and not keep:  # every position came back: cut off the P virtual ones
            out.logits = out.logits[:, P:]  # the caller sees logits for its own T tokens only
        return out

    def first_step(self, input_ids: torch.Tensor):
        """Generation, step 1: [prompt; embeddings(input_ids)] at positions 0..P+T-1, which leaves the
        prompt's keys and values in the cache for every later step (see ``generate``)."""
        return self.model(inputs_embeds=self.embed_with_prompt(input_ids), use_cache=True)

    # -- what save / load need (virtual_tokens.save, VirtualTokenModel.load) --------------------------
    @staticmethod
    def peft_geometry(model: nn.Module) -> dict:
        cfg = text_config(model)
        return {"num_layers": getattr(cfg, "num_hidden_layers", None),
                "token_dim": model.get_input_embeddings().weight.shape[1],
                "num_attention_heads": getattr(cfg, "num_attention_heads", None)}

    @staticmethod
    def saved_width(geometry: dict) -> int:
        return geometry["token_dim"]

    def peft_extras(self) -> dict:
        return {"prompt_tuning_init": PEFT_INITS.get(self.peft_lab_info["init"], "RANDOM"),
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None}

    def embeddings(self) -> torch.Tensor:
        """The soft prompt, (P, d): peft saves its prompt the same way."""
        return self.prompt

    @classmethod
    def from_embeddings(cls, model, embeddings, config, info):
        init = (info or {}).get("init") or FROM_PEFT_INITS.get(config.get("prompt_tuning_init"), "random")
        return cls(model, embeddings.to(model.get_input_embeddings().weight.device), init)


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
    check_settings(model, num_virtual_tokens, init, INITS)
    if model.get_input_embeddings() is None:
        raise ValueError("this model has no input embedding layer (get_input_embeddings() is None)")
    prompt = _init_prompt(model, num_virtual_tokens, init, init_text, tokenizer)
    return PromptTuned(model, prompt, init)


@torch.no_grad()
def nearest_tokens(tuned: PromptTuned, tokenizer, k: int = 1) -> list[list[tuple[str, float]]]:
    """For each learned vector, the k vocabulary tokens whose input embeddings are most similar (cosine).

    A way to peek at what the soft prompt "says": right after a text init each vector's nearest token
    is its own word (similarity 1); after training the vectors usually drift away from every word.
    Explained in notebook 04_prompt_tuning, section 5b.
    """
    weight = tuned.model.get_input_embeddings().weight.detach().float()
    prompt = tuned.prompt.detach().float().to(weight.device)
    sims = nn.functional.normalize(prompt, dim=-1) @ nn.functional.normalize(weight, dim=-1).T  # (P, V)
    values, ids = sims.topk(min(k, weight.shape[0]), dim=-1)
    return [
        [(tokenizer.convert_ids_to_tokens(int(i)), float(v)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values.tolist(), ids.tolist())
    ]


def load(model: nn.Module, folder) -> PromptTuned:
    """Put a saved soft prompt in front of a (fresh) base ``model``: from :func:`save` or peft's
    ``save_pretrained``; the base must match the saved one.

    FileNotFoundError for an empty folder; ValueError naming what differs (another method, model
    type, hidden size, vocabulary, layers, the prompt's shape) or a damaged file.
    Explained in notebook 04_prompt_tuning, section 6.
    """
    return PromptTuned.load(model, folder)
