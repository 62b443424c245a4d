"""Tasks, forgetting material, and batching.

Explained in notebook 00_setup_and_baseline, section "The task".

Every task is classification written as *next-token prediction*: the text is put into a prompt,
and the model's next token should be the label's *verbalizer* word::

    "Review: The soup was cold and bland.\\nSentiment:"  ->  " negative"

So full fine-tuning, LoRA, prefix and prompt tuning all train one objective (cross-entropy of the
verbalizer token), and accuracy is the argmax over the verbalizer tokens only.

Project data (written for this project, in ``data/``): ``reviews.jsonl`` (sentiment),
``fact_probes.jsonl`` (fact recall), ``general_prose.txt`` (encyclopedic prose),
``fictional_world.jsonl`` (invented facts to learn; ``load_facts``). The reviews also make a 6-way
task, ``review_domain`` (what a review is about). Hub data sets
(sst2, rotten_tomatoes, sms_spam, ag_news, wikitext-2) are loaded through ``datasets`` when a network
is there; each loader also takes a local file in the same format (``source=``).
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def quick_mode() -> bool:
    """True when ``PEFT_LAB_QUICK=1``: same code path, fewer steps, smaller evaluation sets."""
    return os.environ.get("PEFT_LAB_QUICK", "0").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class Task:
    """A classification task: splits of (text, label) pairs, a prompt template and a verbalizer."""

    name: str
    train: list
    val: list
    test: list
    verbalizer: dict  # label -> the word the model should say next, with its leading space
    template: str = "{text}\nLabel:"
    max_chars: int = 400  # long texts are cut so every prompt fits a short sequence
    extra: dict = field(default_factory=dict)
    # how a list of examples becomes a batch, for a task whose examples are not (text, label) pairs:
    # encoder(examples, tokenizer, max_length, device) -> batch (a chat task: chat.task)
    encoder: Callable | None = None

    @property
    def labels(self) -> list:
        return list(self.verbalizer)

    @property
    def is_text(self) -> bool:
        """A text task (no verbalizer): train on every token of the texts, test with held-out questions."""
        return not self.verbalizer

    def prompt(self, text: str) -> str:
        text = " ".join(text.split())[: self.max_chars]
        return self.template.format(text=text)

    def __repr__(self):
        return (f"Task({self.name!r}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}; "
                f"verbalizer {self.verbalizer})")


REVIEW_TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER_SENTIMENT = {"negative": " negative", "positive": " positive"}


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _reviews() -> Task:
    rows = read_jsonl(DATA_DIR / "reviews.jsonl")
    split = {s: [(r["text"], r["label"]) for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    return Task("reviews", split["train"], split["val"], split["test"], VERBALIZER_SENTIMENT, REVIEW_TEMPLATE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the Hugging Face hub be reached now? False at once when ``HF_HUB_OFFLINE=1`` (the tests set it), so
    that a notebook's online section is skipped quickly instead of waiting through the loader's retries."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_rows(hub_id: str, config: str | None, split: str, source):
    """Rows of a hub data set, or of a local file in the same format (json/jsonl/csv/tsv/parquet)."""
    import datasets

    if source is None:
        try:
            return datasets.load_dataset(hub_id, config, split=split)
        except Exception as err:  # the hub raises many kinds of errors when offline
            raise RuntimeError(
                f"Could not load {hub_id!r} from the Hugging Face hub (offline?): {err}\n"
                "Use the project's own task, data.load_task('reviews'), or pass source= a local file "
                "with the same columns."
            ) from None
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"No such data file: {source}")
    # A file without a suffix is read as tab-separated: that is how the UCI SMS-spam file ships.
    tab_separated = source.suffix in (".tsv", "")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", "": "csv", ".parquet": "parquet"}.get(source.suffix)
    if kind is None:
        raise ValueError(f"Unsupported file type {source.suffix!r}: use .jsonl, .json, .csv, .tsv (or no suffix, "
                         "read as tab-separated) or .parquet")
    kwargs = {"delimiter": "\t", "quoting": 3} if tab_separated else {}  # quoting 3: quotes are plain text
    if source.stat().st_size == 0:
        raise ValueError(f"{source} is empty: a task file needs a header and one row per example.")
    try:
        return datasets.load_dataset(kind, data_files=str(source), split="train", **kwargs)
    except Exception as err:  # datasets wraps parse errors in its own exceptions
        raise ValueError(f"Could not read {source} as {kind}: {type(err).__name__}: {err}") from None


def _columns(rows, source, *needed) -> None:
    """Refuse a local file that lacks a column the task reads, naming the columns it has."""
    missing = [c for c in needed if c not in rows.column_names]
    if missing:
        raise ValueError(f"{source} has no column {', '.join(map(repr, missing))} (it has {rows.column_names}); "
                         f"a file for this task needs the hub's columns: {', '.join(map(repr, needed))}.")


def _label_name(label, label_names, source, row: int):
    """The label's name for a number 0..n-1 (the hub's coding) or a name itself; anything else is refused."""
    if isinstance(label, str) and label in label_names:
        return label
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(label_names):
        return label_names[label]
    raise ValueError(f"{source}, row {row + 1}: label {label!r} is not one of 0..{len(label_names) - 1} "
                     f"({', '.join(label_names)}) nor one of those names.")


MIN_ROWS = 10  # a 70/10/20 split of fewer leaves a split empty


def _enough(pairs: list, source) -> list:
    if len(pairs) < MIN_ROWS:
        raise ValueError(f"{source} holds {len(pairs)} example(s); a task is cut 70/10/20 into training, validation "
                         f"and test, which needs at least {MIN_ROWS}.")
    return pairs


def _split_70_10_20(pairs: list, seed: int):
    rng = random.Random(seed)
    pairs = pairs[:]
    rng.shuffle(pairs)
    a, b = int(0.7 * len(pairs)), int(0.8 * len(pairs))
    return pairs[:a], pairs[a:b], pairs[b:]


def _sms_spam(source=None, seed: int = 123) -> Task:
    """SMS spam, balanced: all spam plus as many ham sampled with ``seed``; shuffled; split 70/10/20.

    Hub columns: ``sms`` (text) and ``label`` (0 = ham, 1 = spam). The UCI file itself
    (``SMSSpamCollection``, tab-separated with a ``Label<TAB>SMS`` header, labels 'ham'/'spam') works too.
    """
    rows = _hub_rows("ucirvine/sms_spam", None, "train", source)
    text_col = "sms" if "sms" in rows.column_names else "SMS"
    label_col = "label" if "label" in rows.column_names else "Label"
    if source is not None:
        _columns(rows, source, text_col, label_col)
    pairs = [(r[text_col].strip(), _label_name(r[label_col], ["ham", "spam"], source or "ucirvine/sms_spam", i))
             for i, r in enumerate(rows)]
    if source is not None:
        _enough(pairs, source)
    spam = [p for p in pairs if p[1] == "spam"]
    ham = [p for p in pairs if p[1] == "ham"]
    ham = random.Random(seed).sample(ham, len(spam))
    train, val, test = _split_70_10_20(spam + ham, seed)
    return Task("sms_spam", train, val, test, {"ham": " ham", "spam": " spam"},
                "Message: {text}\nSpam or ham:")


def _two_split_task(name, hub_id, text_col, label_names, verbalizer, template, source, seed=0):
    """Hub tasks whose test labels we use as test and whose train split we cut 90/10 for val."""
    if source is None:
        train_rows = _hub_rows(hub_id, None, "train", None)
        test_rows = _hub_rows(hub_id, None, "validation" if name == "sst2" else "test", None)
    else:  # one local file: cut it 70/10/20
        rows = _hub_rows(hub_id, None, "train", source)
        _columns(rows, source, text_col, "label")
        pairs = _enough([(r[text_col], _label_name(r["label"], label_names, source, i)) for i, r in enumerate(rows)],
                        source)
        train, val, test = _split_70_10_20(pairs, seed)
        return Task(name, train, val, test, verbalizer, template)
    train = [(r[text_col], label_names[r["label"]]) for r in train_rows]
    test = [(r[text_col], label_names[r["label"]]) for r in test_rows]
    random.Random(seed).shuffle(train)
    cut = len(train) // 10
    return Task(name, train[cut:], train[:cut], test, verbalizer, template)


REVIEW_DOMAIN_TEMPLATE = "Review: {text}\nTopic:"
VERBALIZER_DOMAIN = {"film": " film", "product": " product", "restaurant": " restaurant",
                     "app": " app", "book": " book", "travel": " travel"}


def _review_domain() -> Task:
    """The same reviews and the same fixed split as ``reviews``, labelled by what they review (6-way)."""
    rows = read_jsonl(DATA_DIR / "reviews.jsonl")
    split = {s: [(r["text"], r["domain"]) for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    return Task("review_domain", split["train"], split["val"], split["test"], VERBALIZER_DOMAIN,
                REVIEW_DOMAIN_TEMPLATE)


def load_task(name: str = "reviews", source=None) -> Task:
    """Load a task by name. Explained in notebook 00_setup_and_baseline, section 2.

    ``reviews`` is the project's own data (offline). ``sst2``, ``rotten_tomatoes``, ``sms_spam`` and
    ``ag_news`` come from the hub through ``datasets``, or from ``source``, a local file in the hub's
    column format.
    """
    neg_pos = ["negative", "positive"]
    loaders = {
        "reviews": lambda: _reviews(),
        "review_domain": lambda: _review_domain(),
        "sms_spam": lambda: _sms_spam(source),
        "sst2": lambda: _two_split_task("sst2", "stanfordnlp/sst2", "sentence", neg_pos,
                                        VERBALIZER_SENTIMENT, REVIEW_TEMPLATE, source),
        "rotten_tomatoes": lambda: _two_split_task("rotten_tomatoes", "cornell-movie-review-data/rotten_tomatoes",
                                                   "text", neg_pos, VERBALIZER_SENTIMENT, REVIEW_TEMPLATE, source),
        "ag_news": lambda: _two_split_task(
            "ag_news", "fancyzhx/ag_news", "text", ["world", "sports", "business", "science"],
            {"world": " world", "sports": " sports", "business": " business", "science": " science"},
            "Article: {text}\nTopic:", source),
    }
    if name not in loaders:
        raise ValueError(f"Unknown task {name!r}. Choose one of: {', '.join(loaders)}.")
    if source is not None and name in ("reviews", "review_domain"):
        raise ValueError(f"{name!r} is the project's own data and reads no file; for your own file choose a task "
                         "with the same columns (sst2, rotten_tomatoes, sms_spam, ag_news) and pass source= it.")
    return loaders[name]()


def subset(task: Task, n: int, seed: int = 0) -> Task:
    """``task`` with only ``n`` training examples, drawn with the same share of every label (a low-data
    task); validation and test stay whole, so results on different sizes are compared on the same items."""
    if n < 1:
        raise ValueError(f"A training set needs at least one example, got n={n}.")
    if n >= len(task.train):
        return task
    rng = random.Random(seed)
    by_label = {}
    for example in task.train:
        by_label.setdefault(example[1], []).append(example)
    for examples in by_label.values():
        rng.shuffle(examples)
    # deal the labels round-robin, so every label gets its share (and every label appears once n >= #labels)
    picked, rounds = [], max(len(v) for v in by_label.values())
    for i in range(rounds):
        for label in sorted(by_label, key=str):
            if i < len(by_label[label]) and len(picked) < n:
                picked.append(by_label[label][i])
    rng.shuffle(picked)
    return Task(f"{task.name}, {n} train", picked, task.val, task.test, task.verbalizer, task.template,
                task.max_chars, dict(task.extra), task.encoder)


# --- forgetting material ------------------------------------------------------------------------

def load_probes() -> list:
    """Fact-recall probes: dicts with ``prompt``, ``answer``, ``topic`` (written for this project)."""
    return read_jsonl(DATA_DIR / "fact_probes.jsonl")


def load_facts() -> list:
    """Invented facts about a fictional world no model has seen (``fictional_world.jsonl``).

    Each fact is a dict with ``id``, ``topic``, ``train`` (one sentence stating the fact, to train on),
    ``questions`` (two or more held-out prompts that end right before the answer) and ``answer``.
    """
    return read_jsonl(DATA_DIR / "fictional_world.jsonl")


def fact_training_texts(facts: list) -> list:
    """The training sentences of ``facts``, one per fact."""
    return [f["train"] for f in facts]


def fact_task(facts: list, name: str = "fictional_facts", validation: bool = False) -> Task:
    """New knowledge as a task: train on the facts' sentences (every token, like pre-training), test on their
    held-out questions (a fact counts as learned when the greedy answer is right).

    ``validation=True`` keeps each fact's first question apart as a validation item and tests on the others,
    so a learning rate can be chosen without looking at the test questions (notebook 05_showdown, section 3).
    Explained in notebook 02_lora, section 5b."""
    if not facts:
        raise ValueError("fact_task needs at least one fact: pass data.load_facts() or a slice of it.")
    train = [(text, None) for text in fact_training_texts(facts)]
    if not validation:
        return Task(name, train, [], fact_questions(facts), {}, template="{text}")
    first = [dict(f, questions=f["questions"][:1]) for f in facts]
    rest = [dict(f, questions=f["questions"][1:]) for f in facts]
    return Task(name, train, fact_questions(first), fact_questions(rest), {}, template="{text}")


def first_facts_task(n: int) -> Task:
    """The first ``n`` invented facts as a task with a validation split (``fact_task(..., validation=True)``),
    named after ``n`` so that a notebook and the study command line find each other's runs in the run log."""
    facts = load_facts()
    if not 1 <= n <= len(facts):
        raise ValueError(f"Ask for between 1 and {len(facts)} facts (the invented world has {len(facts)}), not {n}.")
    return fact_task(facts[:n], name=f"fictional_facts_{n}", validation=True)


def fact_questions(facts: list) -> list:
    """Every held-out question of ``facts`` as a probe (``prompt``, ``answer``, ``topic``), the format of
    ``load_probes()``, so ``measure.score_probes`` scores them."""
    return [{"prompt": q, "answer": f["answer"], "topic": f["topic"]} for f in facts for q in f["questions"]]


def load_prose(source: str | None = None) -> str:
    """General encyclopedic prose for perplexity and divergence (ours, or wikitext-2 when asked)."""
    if source == "wikitext-2":
        rows = _hub_rows("Salesforce/wikitext", "wikitext-2-raw-v1", "validation", None)
        return "\n".join(r["text"] for r in rows if r["text"].strip())
    if source is not None:
        return Path(source).read_text(encoding="utf-8")
    return (DATA_DIR / "general_prose.txt").read_text(encoding="utf-8")


# --- turning examples into batches --------------------------------------------------------------

def verbalizer_ids(task: Task, tokenizer) -> list:
    """The first token id of each label's verbalizer word; they must differ to be told apart."""
    ids = [tokenizer(word, add_special_tokens=False).input_ids[0] for word in task.verbalizer.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"Verbalizer words {list(task.verbalizer.values())} share a first token; pick other words.")
    return ids


def encode(examples: list, task: Task, tokenizer, max_length: int = 64, device=None) -> dict:
    """Tokenise (text, label) pairs into one right-padded batch, on ``device`` (a device or a model;
    default: the CPU). Pass the model you will feed it to, ``device=model``, and it runs anywhere.

    Returns ``input_ids``, ``attention_mask``, ``last`` (index of the last real token, where the
    model predicts the label), ``target`` (the verbalizer token id) and ``label`` (the label index).
    Texts too long for ``max_length`` are cut *inside the text*, so the prompt's ending survives.
    """
    if task.encoder is not None:
        return task.encoder(examples, tokenizer, max_length, device)
    if task.is_text:
        return _encode_texts([text for text, _ in examples], tokenizer, max_length, device)
    labels = task.labels
    targets = verbalizer_ids(task, tokenizer)
    rows = []
    for text, label in examples:
        ids = tokenizer(task.prompt(text), add_special_tokens=False).input_ids
        if len(ids) > max_length:
            tail = tokenizer(task.template.split("{text}")[-1], add_special_tokens=False).input_ids
            ids = ids[: max_length - len(tail)] + tail
        rows.append((ids, labels.index(label)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    label_idx = torch.tensor([y for _, y in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "last": mask.sum(1) - 1,
        "target": torch.tensor(targets)[label_idx],
        "label": label_idx,
    }
    return batch if device is None else to_device(batch, device)


def _encode_texts(texts: list, tokenizer, max_length: int, device) -> dict:
    """Right-padded texts with ``labels`` for a causal language-model loss (padding is -100: not scored)."""
    rows = [tokenizer(text, add_special_tokens=False).input_ids[:max_length] for text in texts]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}
    return batch if device is None else to_device(batch, device)


def token_ids(tokenizer, text: str, device=None, special_tokens: bool = True) -> torch.Tensor:
    """``text`` as a (1, tokens) tensor of ids on ``device`` (a device or a model; default: the CPU).

    The tokenizer itself always returns CPU tensors; a model on a GPU needs its inputs on the GPU.
    """
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=special_tokens).input_ids
    return ids if device is None else ids.to(device_of(device))


def device_of(model_or_device) -> torch.device:
    """The device of a model (where its parameters live), or ``torch.device`` of a device name."""
    if isinstance(model_or_device, torch.nn.Module):
        return next(model_or_device.parameters()).device
    return torch.device(model_or_device)


def batches(examples: list, task: Task, tokenizer, batch_size: int = 8, max_length: int = 64,
            shuffle: bool = False, seed: int = 0):
    """Yield encoded batches; with ``shuffle`` the order is drawn from ``seed`` (reproducible)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield encode([examples[i] for i in order[start: start + batch_size]], task, tokenizer, max_length)


def endless_batches(examples: list, task: Task, tokenizer, batch_size: int = 8, max_length: int = 64, seed: int = 0):
    """Epoch after epoch of shuffled batches (a new order each epoch, all drawn from ``seed``)."""
    epoch = 0
    while True:
        yield from batches(examples, task, tokenizer, batch_size, max_length, shuffle=True, seed=seed * 1000 + epoch)
        epoch += 1


def to_device(batch: dict, device) -> dict:
    """Every tensor of ``batch`` on ``device`` (a device or a model)."""
    device = device_of(device)
    return {k: v.to(device) for k, v in batch.items()}
