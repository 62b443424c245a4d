"""Instruction tuning (``chat.py``): the answer-only labels, the loss against Hugging Face's own, the grading."""
import json

import pytest
import torch

from peft_lab import chat

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture
def chat_tokenizer(tokenizer):
    """The tiny word tokenizer with ChatML's two special tokens and template."""
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHATML
    return tokenizer


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


def test_the_loss_equals_hugging_faces_own(chat_tokenizer, tiny_llama):
    tiny_llama.resize_token_embeddings(len(chat_tokenizer))
    batch = chat.encode(chat_tokenizer, [conversation(), conversation("i hated this movie", "negative")])
    assert (batch["labels"] != chat.IGNORE).sum() == 4                 # two answers, two end-of-turn tokens
    ours = chat.chat_loss(tiny_llama, batch)
    theirs = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
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


def test_greedy_answers_come_back_one_per_conversation(chat_tokenizer, tiny_llama):
    tiny_llama.resize_token_embeddings(len(chat_tokenizer))
    texts = chat.answers(tiny_llama, chat_tokenizer, [conversation(), conversation("i hated this movie")],
                         max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert chat_tokenizer.padding_side == "right"                      # put back as it was
