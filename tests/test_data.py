"""The project's data and the task loaders (offline: hub formats are tested on small local files)."""
import json
from collections import Counter

import pytest

from peft_lab import data


def test_reviews_are_balanced_with_a_fixed_split():
    task = data.load_task("reviews")
    assert len(task.train) + len(task.val) + len(task.test) >= 600
    for split in (task.train, task.val, task.test):
        counts = Counter(label for _, label in split)
        assert counts["positive"] == counts["negative"]
    texts = [t for split in (task.train, task.val, task.test) for t, _ in split]
    assert len(set(texts)) == len(texts), "a review appears twice (or in two splits)"
    assert data.load_task("reviews").test == task.test  # the split is fixed, not re-drawn


def test_forgetting_material_is_large_enough():
    probes = data.load_probes()
    assert len(probes) >= 200
    assert all(p["prompt"] and p["answer"] for p in probes)
    assert len(data.load_prose().split()) >= 5000


def test_encode_pads_right_and_points_at_the_last_real_token(tokenizer):
    task = data.Task("t", [], [], [], data.VERBALIZER_SENTIMENT, data.REVIEW_TEMPLATE)
    batch = data.encode([("the film was great", "positive"), ("bad", "negative")], task, tokenizer)
    assert batch["input_ids"].shape[0] == 2
    short = batch["attention_mask"][1]
    assert short.tolist() == sorted(short.tolist(), reverse=True)  # ones first, padding on the right
    for row, last in zip(batch["input_ids"], batch["last"]):
        assert tokenizer.convert_ids_to_tokens(int(row[last])) == ":"  # ends with "Sentiment:"
    assert batch["target"].tolist() == [tokenizer.convert_tokens_to_ids("positive"),
                                        tokenizer.convert_tokens_to_ids("negative")]


def test_long_texts_are_cut_inside_the_text_so_the_prompt_ending_survives(tokenizer):
    task = data.Task("t", [], [], [], data.VERBALIZER_SENTIMENT, data.REVIEW_TEMPLATE)
    batch = data.encode([("great " * 100, "positive")], task, tokenizer, max_length=16)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 16
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["Sentiment", ":"]


def test_verbalizer_words_must_differ_in_their_first_token(tokenizer):
    task = data.Task("t", [], [], [], {"a": " the film", "b": " the end"})
    with pytest.raises(ValueError, match="share a first token"):
        data.verbalizer_ids(task, tokenizer)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="reviews.*sms_spam"):
        data.load_task("imdb")


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def test_sms_spam_loader_balances_and_splits_70_10_20(tmp_path):
    rows = [{"sms": f"win a prize number {i}", "label": 1} for i in range(20)]
    rows += [{"sms": f"see you at dinner {i}", "label": 0} for i in range(60)]
    task = data.load_task("sms_spam", source=_write_jsonl(tmp_path / "sms.jsonl", rows))
    assert (len(task.train), len(task.val), len(task.test)) == (28, 4, 8)
    everything = task.train + task.val + task.test
    assert Counter(label for _, label in everything) == {"spam": 20, "ham": 20}
    again = data.load_task("sms_spam", source=tmp_path / "sms.jsonl")
    assert again.test == task.test  # seeded: the same split every time


@pytest.mark.parametrize("filename", ["SMSSpamCollection.tsv", "SMSSpamCollection"])
def test_sms_spam_loader_reads_the_uci_tab_separated_layout(tmp_path, filename):
    # the UCI file ships without a suffix; a quote inside a message must stay plain text
    lines = ["Label\tSMS"] + [f'spam\tFree "entry" {i} now' for i in range(10)] + [f"ham\tOk lar {i}" for i in range(30)]
    path = tmp_path / filename
    path.write_text("\n".join(lines), encoding="utf-8")
    task = data.load_task("sms_spam", source=path)
    assert Counter(label for _, label in task.train + task.val + task.test) == {"spam": 10, "ham": 10}
    assert task.verbalizer == {"ham": " ham", "spam": " spam"}
    assert any('"entry"' in text for text, _ in task.train + task.val + task.test)


def test_missing_or_unknown_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such data file"):
        data.load_task("sms_spam", source=tmp_path / "nowhere.tsv")
    odd = tmp_path / "sms.xlsx"
    odd.write_text("x")
    with pytest.raises(ValueError, match="Unsupported file type '.xlsx'"):
        data.load_task("sms_spam", source=odd)


@pytest.mark.parametrize("name,column,n_labels", [("sst2", "sentence", 2), ("rotten_tomatoes", "text", 2),
                                                  ("ag_news", "text", 4)])
def test_hub_classification_loaders_on_local_files(tmp_path, name, column, n_labels):
    rows = [{column: f"example text {i}", "label": i % n_labels} for i in range(40)]
    task = data.load_task(name, source=_write_jsonl(tmp_path / f"{name}.jsonl", rows))
    assert len(task.train) + len(task.val) + len(task.test) == 40
    assert len(task.labels) == n_labels
    assert "example text" in task.prompt(task.train[0][0])


def test_offline_hub_load_gives_a_clear_error(monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(RuntimeError, match="reviews"):
        data.load_task("sst2")


def test_quick_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("PEFT_LAB_QUICK", "0")
    assert not data.quick_mode()
    monkeypatch.setenv("PEFT_LAB_QUICK", "1")
    assert data.quick_mode()


def test_hub_reachable_is_false_offline_without_waiting(monkeypatch):
    import socket
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert data.hub_reachable() is False
