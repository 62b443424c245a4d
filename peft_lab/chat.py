"""Instruction tuning a chat model: conversations through the model's chat template, the loss on the answer only.

The task (``data/chat_records.jsonl``, written for this project): a harbour-log sentence in, a one-line JSON record
out, with seven named fields. A program grades it: the answer is right when it is exactly the record, and well-formed
when it parses as a JSON object with the seven fields.

How a conversation becomes a training row (``encode``): the chat template writes the whole conversation as text
(``tokenizer.apply_chat_template``); the same template with the answer left out and the assistant's turn opened
(``add_generation_prompt=True``) is the prompt. The labels copy the tokens and blank out (-100, which the loss skips)
every token of the prompt and whatever follows the end-of-turn token; the answer's tokens and its end-of-turn token
stay, so the model learns both what to say and when to stop. The model shifts nothing itself in ``chat_loss``: the
logits at position t score the token at t + 1, as Hugging Face's own ``labels=`` loss does.

Written for notebook 08 (instruction tuning), which is not in the workbook yet; tests/test_chat.py checks it.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from . import data as data_mod
from .stats import bits, fingerprint

PATH = data_mod.DATA_DIR / "chat_records.jsonl"
FIELDS = ("person", "vessel", "place", "day", "month", "cargo", "count")
IGNORE = -100  # the label the cross-entropy skips


def load(split: str | None = None) -> list:
    """The conversations of ``split`` ("train", "val", "test"), or all of them: dicts with ``messages`` (a user
    turn and the assistant's answer) and ``fields`` (the record the answer writes)."""
    rows = data_mod.read_jsonl(PATH)
    if split is None:
        return rows
    chosen = [r for r in rows if r["split"] == split]
    if not chosen:
        raise ValueError(f"No conversations in split {split!r}; the splits are "
                         f"{', '.join(sorted({r['split'] for r in rows}))}.")
    return chosen


def end_of_turn_id(tokenizer) -> int:
    """The token that closes a turn in the chat template (``<|im_end|>`` in ChatML templates, else EOS)."""
    token = "<|im_end|>" if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token
    if token is None:
        raise ValueError("This tokenizer has no end-of-turn token and no EOS token: a chat model needs one.")
    return tokenizer.convert_tokens_to_ids(token)


def prompt_and_answer_ids(tokenizer, messages: list) -> tuple:
    """(ids of the whole conversation, how many of them are the prompt). The prompt is the template with the last
    (assistant) turn left out and the assistant's turn opened, and must be the start of the whole text's tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("This tokenizer has no chat template (tokenizer.chat_template is empty): load an instruct "
                         "model, e.g. models.load(), whose tokenizer carries one.")
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("A training conversation must end with the assistant's answer (role 'assistant').")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ValueError("The chat template writes the prompt differently inside the whole conversation; "
                         "the answer's position cannot be found from it.")
    ids = tokenizer(full, add_special_tokens=False).input_ids
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    if ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("The prompt's tokens are not the first tokens of the whole conversation (a merge across "
                         "the boundary); end the prompt on a special token or a newline.")
    return ids, len(prompt_ids)


def answer_labels(ids: list, prompt_len: int, end_id: int) -> list:
    """Labels for ``ids``: the answer's tokens up to and with the first end-of-turn token after the prompt; the
    rest blanked out with -100. The learner writes this in notebook 08's exercise."""
    labels = [IGNORE] * len(ids)
    for i in range(prompt_len, len(ids)):
        labels[i] = ids[i]
        if ids[i] == end_id:
            break
    return labels


def encode(tokenizer, conversations: list, max_length: int = 192, device=None) -> dict:
    """A padded batch (right padding) of whole conversations: ``input_ids``, ``attention_mask``, ``labels`` (the
    answer and its end-of-turn token; -100 elsewhere). A conversation longer than ``max_length`` is refused, not
    cut: a cut answer would teach the model to stop mid-record."""
    end_id = end_of_turn_id(tokenizer)
    rows = []
    for conv in conversations:
        ids, prompt_len = prompt_and_answer_ids(tokenizer, conv["messages"])
        if len(ids) > max_length:
            raise ValueError(f"A conversation has {len(ids)} tokens, more than max_length={max_length}; raise it.")
        rows.append((ids, answer_labels(ids, prompt_len, end_id)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    batch = {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows]),
    }
    return data_mod.to_device(batch, device) if device is not None else batch


def chat_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens: the logits at position t score the label at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)


# --- grading -------------------------------------------------------------------------------------------

def parse_record(text: str):
    """The answer as a record: a dict with exactly the seven fields, or None when it is not one."""
    try:
        record = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and sorted(record) == sorted(FIELDS) else None


@torch.no_grad()
def answers(model, tokenizer, conversations: list, max_new_tokens: int = 64, batch_size: int = 16) -> list:
    """The model's greedy answers to the user turns of ``conversations`` (left padding, the chat template's
    generation prompt), as text up to the end-of-turn token."""
    end_id = end_of_turn_id(tokenizer)
    device = data_mod.device_of(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [tokenizer.apply_chat_template(c["messages"][:-1], tokenize=False, add_generation_prompt=True)
                       for c in conversations[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end_id,
                                       pad_token_id=tokenizer.pad_token_id or end_id)
            for row in generated[:, enc["input_ids"].shape[1]:].tolist():
                row = row[:row.index(end_id)] if end_id in row else row
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return out


def grade(texts: list, conversations: list) -> dict:
    """Exact match (the record itself, field for field) and format compliance (a JSON object with the seven
    fields), with the per-item right/wrong strings ``stats`` pairs two runs by."""
    if len(texts) != len(conversations):
        raise ValueError(f"{len(texts)} answers for {len(conversations)} conversations.")
    records = [parse_record(t) for t in texts]
    exact = [r == c["fields"] for r, c in zip(records, conversations)]
    formed = [r is not None for r in records]
    n = len(texts)
    items = fingerprint(c["messages"][0]["content"] for c in conversations)
    return {"accuracy": sum(exact) / n, "n": n, "correct": bits(exact), "items": items,
            "format": sum(formed) / n, "format_correct": bits(formed)}
