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

``task()`` makes the conversations a ``data.Task`` whose batches are ``encode``'s, so ``train.fit`` trains every
method on them unchanged: its text loss (``train.text_loss``) scores exactly the labels ``encode`` kept.

Explained in notebook 08_chat_tuning; tests/test_chat.py checks it.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import time

import torch
import torch.nn.functional as F

from . import data as data_mod
from . import memory, models, stats
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
    prompt = prompt_text(tokenizer, messages)
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


def row(tokenizer, messages: list, end_id: int | None = None) -> tuple:
    """One conversation as a training row: (its ids, their labels), the answer and its end-of-turn token kept."""
    ids, prompt_len = prompt_and_answer_ids(tokenizer, messages)
    return ids, answer_labels(ids, prompt_len, end_of_turn_id(tokenizer) if end_id is None else end_id)


def encode(tokenizer, conversations: list, max_length: int = 192, device=None) -> dict:
    """A padded batch (right padding) of whole conversations: ``input_ids``, ``attention_mask``, ``labels`` (the
    answer and its end-of-turn token; -100 elsewhere). A conversation longer than ``max_length`` is refused, not
    cut: a cut answer would teach the model to stop mid-record."""
    end_id = end_of_turn_id(tokenizer)
    rows = []
    for conv in conversations:
        ids, labels = row(tokenizer, conv["messages"], end_id)
        if len(ids) > max_length:
            raise ValueError(f"A conversation has {len(ids)} tokens, more than max_length={max_length}; raise it.")
        rows.append((ids, labels))
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


def step_cost(tuned, batch: dict, loss, repeats: int = 3) -> dict:
    """What one training step's forward and backward cost with ``loss`` (``chat_loss``: the head at every position;
    ``train.text_loss``: only where an answer token is scored): the bytes autograd saves for the backward pass
    (``memory.count_saved_activations``, counted in the first step) and the median seconds of the ``repeats`` steps
    after it. Gradients are dropped after each step; nothing is updated."""
    device = data_mod.device_of(tuned)
    unique = list({id(p): p for p in tuned.parameters()}.values())
    seconds, saved = [], {}
    for i in range(repeats + 1):  # step 0 counts (and pays one-off allocations); the others are timed
        counting = memory.count_saved_activations(unique, models.compute_dtype(device)) if i == 0 \
            else contextlib.nullcontext({})
        started = time.perf_counter()
        with counting as counted, models.autocast(device):
            value = loss(tuned, batch)
        value.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        saved = saved or counted
        tuned.zero_grad(set_to_none=True)
    return {"activations MiB": saved["bytes"] / 2 ** 20, "s/step": statistics.median(seconds[1:]),
            "loss": value.item()}


def task(name: str = "chat_records") -> data_mod.Task:
    """The conversations as a task for ``train.fit``: examples are (conversation, None) pairs, batches come from
    ``encode`` (answer-only labels), and ``fit``'s text loss trains on them. Pass ``max_length=192`` to ``fit``:
    a conversation is refused, not cut, when it is longer."""
    def encoder(examples, tokenizer, max_length, device):
        return encode(tokenizer, [conv for conv, _ in examples], max_length, device)

    def split(name):
        return [(conv, None) for conv in load(name)]

    return data_mod.Task(name, split("train"), split("val"), split("test"), {}, template="{text}", encoder=encoder)


def prompt_text(tokenizer, messages: list) -> str:
    """The chat template's prompt for ``messages`` (a conversation without its answer, or with it: a last
    assistant turn is left out), the assistant's turn opened."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list) -> list:
    """The ids of ``prompt_text``: what the model answers from."""
    return tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False).input_ids


@torch.no_grad()
def answers(model, tokenizer, conversations: list, max_new_tokens: int = 64, batch_size: int = 16) -> list:
    """The model's greedy answers to the user turns of ``conversations`` (the chat template's generation prompt),
    as text up to the end-of-turn token, in the order given.

    Prompts of the same length share a batch, so no row is padded: every model answers the same whatever the
    batch (a prefix's or a soft prompt's ``generate`` takes no padding at all)."""
    end_id = end_of_turn_id(tokenizer)
    device = data_mod.device_of(model)
    prompts = [prompt_ids(tokenizer, c["messages"]) for c in conversations]
    by_length = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    out = [None] * len(prompts)
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            with models.autocast(device):
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_new_tokens, eos_token_id=end_id,
                                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                           else end_id)
            for i, row in zip(chunk, generated[:, ids.shape[1]:].tolist()):
                row = row[:row.index(end_id)] if end_id in row else row
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def reply(model, tokenizer, message: str, max_new_tokens: int = 64) -> str:
    """The model's greedy answer to one user message, through the chat template (the chat panel's)."""
    if not message.strip():
        raise ValueError("Type a message first.")
    return answers(model, tokenizer, [{"messages": [{"role": "user", "content": message}]}], max_new_tokens)[0]


def evaluate(model, tokenizer, conversations: list, max_new_tokens: int = 64) -> dict:
    """``grade`` of the model's greedy answers, with the answers themselves under ``texts``."""
    texts = answers(model, tokenizer, conversations, max_new_tokens)
    return {**grade(texts, conversations), "texts": texts}


# --- grading -------------------------------------------------------------------------------------------

def parse_record(text: str):
    """The answer as a record: a dict with exactly the seven fields, or None when it is not one."""
    try:
        record = json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and sorted(record) == sorted(FIELDS) else None


def score(result: dict, kind: str = "exact") -> dict:
    """A graded result as an accuracy result that ``stats`` compares and pairs: ``kind`` "exact" (the record) or
    "format" (well-formed)."""
    keys = {"exact": ("accuracy", "correct"), "format": ("format", "format_correct")}
    if kind not in keys:
        raise ValueError(f"kind is 'exact' or 'format', not {kind!r}.")
    share, correct = keys[kind]
    return {"accuracy": result[share], "n": result["n"], "correct": result[correct], "items": result["items"]}


def summary_row(entries: list, zero_shot: dict) -> dict:
    """One method's line of notebook 08's table, from its runs (one per seed): each entry a dict with ``run`` (the
    ``RunRecord``), ``graded`` (``evaluate`` on the test conversations) and ``forgot`` (``measure.forgetting``).
    Exact and well-formed are means over the seeds; the exact answers' gain over zero-shot pairs each seed with the
    base on the same conversations (``stats.paired_over_seeds``): its points, and its verdict under ``vs zero-shot``."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    gain = stats.paired_over_seeds([(score(e["graded"]), score(zero_shot)) for e in entries])
    table = memory.memory_table(entries[0]["run"])
    return {
        "exact %": 100 * mean([e["graded"]["accuracy"] for e in entries]),
        "exact vs zero-shot, points": f"{100 * gain['diff']:+.1f} [{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}]",
        "vs zero-shot": gain["verdict"],
        "well-formed %": 100 * mean([e["graded"]["format"] for e in entries]),
        "KL on prose": mean([e["forgot"]["kl"] for e in entries]),
        "probes kept %": 100 * mean([e["forgot"]["kept_greedy"] for e in entries]),
        "step memory MiB": table["weights+grads+optimizer MiB"] + table["activations MiB"],
        "s/step": mean([e["run"].seconds_per_step for e in entries]),
        "trained numbers": entries[0]["run"].trainable_params,
    }


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
