"""Instruction tuning (``chat.py``): the answer-only labels, the loss against Hugging Face's own, the grading."""
import json
import math
import re

import warnings

import pytest
import torch

from peft_lab import chat

def conversation(question="the film was great", answer="positive"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "fields": None}


def test_the_labels_keep_the_answer_and_its_end_of_turn_only(chat_tokenizer):
    ids, prompt_len = chat.prompt_and_answer_ids(chat_tokenizer, conversation()["messages"])
    end = chat.end_of_turn_id(chat_tokenizer)
    labels = chat.answer_labels(ids, prompt_len, end)
    kept = [i for i, lab in enumerate(labels) if lab != chat.IGNORE]
    assert chat_tokenizer.convert_ids_to_tokens([ids[i] for i in kept]) == ["positive", "<|im_end|>"]
    assert all(lab == chat.IGNORE for lab in labels[:prompt_len])
    # whatever follows the end of the turn (a newline, a next turn) is not scored
    assert chat.answer_labels([5, 6, 7, 8, 9], 1, end_id=7) == [chat.IGNORE, 6, 7, chat.IGNORE, chat.IGNORE]


def test_the_loss_equals_hugging_faces_own(chat_tokenizer, chat_llama):
    batch = chat.encode(chat_tokenizer, [conversation(), conversation("i hated this movie", "negative")])
    assert (batch["labels"] != chat.IGNORE).sum() == 4                 # two answers, two end-of-turn tokens
    ours = chat.chat_loss(chat_llama, batch)
    theirs = chat_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_bad_conversations_are_refused_with_what_to_do(chat_tokenizer, tokenizer):
    with pytest.raises(ValueError, match="end with the assistant"):
        chat.prompt_and_answer_ids(chat_tokenizer, conversation()["messages"][:1])
    with pytest.raises(ValueError, match="max_length"):
        chat.encode(chat_tokenizer, [conversation()], max_length=3)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat.prompt_and_answer_ids(tokenizer, conversation()["messages"])


def test_grading_tells_exact_from_well_formed():
    fields = {"person": "Ada Brine", "vessel": "Gull", "place": "Ostrevik", "day": 3, "month": "Thawmonth",
              "cargo": "salt", "count": 4}
    conv = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": json.dumps(fields)}],
            "fields": fields}
    wrong = json.dumps({**fields, "count": 5})
    result = chat.grade([json.dumps(fields), wrong, "not json", '{"person": "Ada Brine"}'], [conv] * 4)
    assert result["correct"] == "1000" and result["format_correct"] == "1100"
    assert result["accuracy"] == 0.25 and result["format"] == 0.5
    with pytest.raises(ValueError, match="3 answers for 4"):
        chat.grade(["a", "b", "c"], [conv] * 4)


def test_the_splits_and_their_records():
    sizes = {s: len(chat.load(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 360, "val": 80, "test": 240}
    row = chat.load("test")[0]
    assert chat.parse_record(row["messages"][1]["content"]) == row["fields"]
    with pytest.raises(ValueError, match="the splits are"):
        chat.load("dev")


def test_greedy_answers_come_back_one_per_conversation(chat_tokenizer, chat_llama):
    texts = chat.answers(chat_llama, chat_tokenizer, [conversation(), conversation("i hated this movie")],
                         max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert chat_tokenizer.padding_side == "right"                      # put back as it was


def chat_task():
    """The chat task's shape on a handful of tiny conversations: (conversation, None) pairs, chat.encode's batches."""
    task = chat.task()
    convs = [conversation(), conversation("i hated this movie", "negative"), conversation("the food was bad", "negative"),
             conversation("it was very good", "positive")]
    task.train, task.val, task.test = [(c, None) for c in convs], [], [(c, None) for c in convs]
    return task, convs


def test_the_training_loop_trains_a_chat_task_on_the_answer_only(chat_tokenizer, chat_llama):
    from peft_lab import data, train
    from peft_lab.methods import lora

    task, convs = chat_task()
    batch = data.encode(task.train, task, chat_tokenizer, max_length=64)
    assert torch.equal(batch["labels"], chat.encode(chat_tokenizer, convs)["labels"])   # the task's batches are encode's
    tuned = lora.apply(chat_llama, rank=2, alpha=4, targets=["q_proj", "v_proj"])
    run = train.fit(tuned, chat_tokenizer, task, steps=3, lr=1e-2, batch_size=4, max_length=64, log=False,
                    progress=False)
    assert len(run.losses) == 3 and all(math.isfinite(v) for v in run.losses)
    with pytest.raises(ValueError, match="max_length"):
        train.fit(tuned, chat_tokenizer, task, steps=1, max_length=4, log=False, progress=False)


def test_the_head_runs_only_where_an_answer_is_scored_with_the_same_loss(chat_tokenizer, chat_llama, monkeypatch):
    from peft_lab import train

    batch = chat.encode(chat_tokenizer, [conversation(), conversation("i hated this movie very very much", "negative")])
    seen = {}
    forward = chat_llama.forward

    def spy(*args, **kwargs):
        seen["keep"] = kwargs.get("logits_to_keep")
        return forward(*args, **kwargs)

    monkeypatch.setattr(chat_llama, "forward", spy)
    trimmed = train.text_loss(chat_llama, batch)
    keep = seen["keep"]
    scored = (batch["labels"][:, 1:] != chat.IGNORE).any(0).nonzero().squeeze(1)
    assert torch.is_tensor(keep) and torch.equal(keep, scored) and len(keep) < batch["input_ids"].shape[1] - 1
    assert torch.allclose(trimmed, chat.chat_loss(chat_llama, batch), atol=1e-6)
    # a text scored at every position (new facts) still gets the whole-width head
    texts = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
             "labels": batch["input_ids"].clone()}
    train.text_loss(chat_llama, texts)
    assert not torch.is_tensor(seen["keep"])


def test_a_step_with_the_head_on_the_answer_only_saves_less(chat_tokenizer, chat_llama):
    from peft_lab import train

    batch = chat.encode(chat_tokenizer, [conversation("the film was great and the food was very good " * 3)] * 2)
    everywhere = chat.step_cost(chat_llama, batch, chat.chat_loss, repeats=1)
    answer_only = chat.step_cost(chat_llama, batch, train.text_loss, repeats=1)
    assert answer_only["activations MiB"] < everywhere["activations MiB"]
    assert abs(answer_only["loss"] - everywhere["loss"]) < 1e-2
    assert all(p.grad is None for p in chat_llama.parameters())                    # nothing kept, nothing updated


def test_answers_keep_the_order_and_do_not_depend_on_the_batch(chat_tokenizer, chat_llama):
    convs = [conversation(), conversation("i hated this movie very much"), conversation("bad"), conversation("good")]
    together = chat.answers(chat_llama, chat_tokenizer, convs, max_new_tokens=3)
    alone = [chat.answers(chat_llama, chat_tokenizer, [c], max_new_tokens=3)[0] for c in convs]
    assert together == alone
    assert chat.reply(chat_llama, chat_tokenizer, "the film was great", max_new_tokens=3) == alone[0]
    with pytest.raises(ValueError, match="Type a message"):
        chat.reply(chat_llama, chat_tokenizer, "  ")


def test_a_prompt_tuned_model_answers_too(chat_tokenizer, chat_llama):
    from peft_lab.methods import prompt

    tuned = prompt.apply(chat_llama, 3)
    texts = chat.answers(tuned, chat_tokenizer, [conversation(), conversation("i hated this movie very much")],
                         max_new_tokens=3)
    assert len(texts) == 2


def test_scores_are_accuracy_results_that_pair():
    from peft_lab import stats

    result = {"accuracy": 0.5, "format": 1.0, "n": 2, "correct": "10", "format_correct": "11", "items": "abc"}
    exact, formed = chat.score(result), chat.score(result, "format")
    assert exact["correct"] == "10" and formed["correct"] == "11" and formed["accuracy"] == 1.0
    assert stats.paired_counts(formed, exact) == (1, 0)
    with pytest.raises(ValueError, match="'exact' or 'format'"):
        chat.score(result, "json")


def test_peft_and_the_trainer_compute_our_loss(chat_tokenizer, chat_llama):
    from peft_lab import libraries

    _, convs = chat_task()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = libraries.chat_with_peft_and_trainer(chat_llama, chat_tokenizer, convs, steps=2, lr=1e-3,
                                                      batch_size=2)
    # peft's calls to transformers' renamed checkpointing flag warn of the rename: hushed, not shown to a learner
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    losses = list(result["losses"].values())
    assert max(losses) - min(losses) < 1e-2 and len(result["trainer_losses"]) == 2
    assert result["trainable"] > 0


def test_one_row_is_what_encode_batches_and_what_the_trainer_is_given(chat_tokenizer):
    conv = conversation()
    ids, labels = chat.row(chat_tokenizer, conv["messages"])
    batch = chat.encode(chat_tokenizer, [conv])
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels
    assert chat.prompt_ids(chat_tokenizer, conv["messages"]) == ids[:chat.prompt_and_answer_ids(chat_tokenizer, conv["messages"])[1]]


def test_a_summary_row_gives_its_verdict_apart_from_its_numbers():
    from peft_lab import runlog

    memory = {"weights": 2 ** 20, "gradients": 0, "optimizer": 0, "activations": 2 ** 20, "process_peak": 0}
    run = runlog.RunRecord(method="lora", task="chat_records", config={}, trainable_params=5, total_params=10,
                           step_seconds=[1.0, 0.5], memory=memory)
    def graded(correct):
        return {"accuracy": correct.count("1") / len(correct), "n": len(correct), "correct": correct,
                "items": "same", "format": 1.0, "format_correct": "1" * len(correct)}
    forgot = {"kl": 0.1, "kept_greedy": 0.5}
    zero_shot = graded("0" * 40)
    learned = chat.summary_row([{"run": run, "graded": graded("1" * 30 + "0" * 10), "forgot": forgot}] * 3, zero_shot)
    assert learned["vs zero-shot"] == "higher" and learned["exact %"] == 75.0
    # the points alone (the interval also holds the 40 items' own uncertainty); the verdict has its own column
    assert re.fullmatch(r"\+75\.0 \[\+\d+\.\d, \+\d+\.\d\]", learned["exact vs zero-shot, points"])
    nothing = chat.summary_row([{"run": run, "graded": graded("0" * 40), "forgot": forgot}] * 3, zero_shot)
    assert nothing["vs zero-shot"] == "no measurable difference"
