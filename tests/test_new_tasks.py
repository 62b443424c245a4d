"""The tasks that leave the base model room to improve: the 6-way review topic and the fictional world."""
import re
from collections import Counter

import pytest
import torch

from peft_lab import data

DOMAINS = {"film", "product", "restaurant", "app", "book", "travel"}


# --- review_domain: which kind of thing a review is about ------------------------------------------

def _review_rows():
    return data.read_jsonl(data.DATA_DIR / "reviews.jsonl")


def test_review_domain_uses_the_reviews_texts_and_split():
    task = data.load_task("review_domain")
    reviews = data.load_task("reviews")
    for name in ("train", "val", "test"):
        ours, theirs = getattr(task, name), getattr(reviews, name)
        assert len(ours) == len(theirs)
        assert [t for t, _ in ours] == [t for t, _ in theirs], f"{name}: not the same texts as 'reviews'"
    assert data.load_task("review_domain").test == task.test  # fixed, not re-drawn


def test_review_domain_labels_are_the_domain_field():
    task = data.load_task("review_domain")
    assert set(task.labels) == DOMAINS
    truth = {r["text"]: r["domain"] for r in _review_rows()}
    for split in (task.train, task.val, task.test):
        assert all(truth[text] == label for text, label in split)


def test_every_domain_is_in_every_split_and_the_splits_stay_balanced():
    task = data.load_task("review_domain")
    for name in ("train", "val", "test"):
        counts = Counter(label for _, label in getattr(task, name))
        assert set(counts) == DOMAINS, f"{name} misses a label"
        assert max(counts.values()) - min(counts.values()) <= 2, f"{name} is unbalanced: {counts}"


def test_review_domain_verbalizer_is_six_distinct_single_words_with_a_leading_space():
    task = data.load_task("review_domain")
    words = list(task.verbalizer.values())
    assert len(words) == 6 and len(set(words)) == 6
    assert all(re.fullmatch(r" [a-z]+", w) for w in words), words
    # distinct even after the leading space, and none is the start of another (safer first tokens)
    bare = [w.strip() for w in words]
    assert not any(a != b and b.startswith(a) for a in bare for b in bare)
    prompt = task.prompt(task.test[0][0])
    assert prompt.startswith("Review: ") and prompt.endswith("\nTopic:")


def test_review_domain_is_listed_among_the_tasks():
    with pytest.raises(ValueError, match="review_domain"):
        data.load_task("imdb")


# --- the fictional world: new knowledge, trained on one sentence, asked in other words ---------------

@pytest.fixture(scope="module")
def facts():
    return data.load_facts()


def test_fictional_world_is_large_enough_with_unique_ids(facts):
    assert len(facts) >= 300
    ids = [f["id"] for f in facts]
    assert len(set(ids)) == len(ids)
    for f in facts:
        assert set(f) >= {"id", "topic", "train", "questions", "answer"}
        assert len(f["questions"]) >= 2, f["id"]
        assert len(set(f["questions"])) == len(f["questions"]), f["id"]


def test_answers_are_short_names_or_numbers_stated_by_the_training_sentence(facts):
    for f in facts:
        answer = f["answer"]
        assert 1 <= len(answer.split()) <= 3, f["id"]
        assert answer[0].isupper() or answer[0].isdigit(), f["id"]
        assert answer == answer.strip()
        assert answer in f["train"], f"{f['id']}: the training sentence does not state the answer"


def test_questions_are_held_out_and_do_not_give_the_answer_away(facts):
    for f in facts:
        train = f["train"].lower()
        for q in f["questions"]:
            assert q and q == q.rstrip(), f"{f['id']}: a prompt must end right before the answer"
            assert f["answer"].lower() not in q.lower(), f"{f['id']}: answer inside its question {q!r}"
            assert q.lower() != train
            assert q.lower() not in train, f"{f['id']}: question {q!r} is copied from the training sentence"


def test_no_question_is_asked_twice_with_two_answers(facts):
    seen = {}
    for f in facts:
        for q in f["questions"]:
            assert seen.setdefault(q, f["answer"]) == f["answer"], q


def test_training_texts_and_questions_helpers(facts):
    texts = data.fact_training_texts(facts)
    assert texts == [f["train"] for f in facts]
    questions = data.fact_questions(facts)
    assert len(questions) == sum(len(f["questions"]) for f in facts)
    probe_keys = set(data.load_probes()[0])
    assert all(set(q) == probe_keys == {"prompt", "answer", "topic"} for q in questions)
    assert questions[0]["prompt"] == facts[0]["questions"][0]
    assert questions[0]["answer"] == facts[0]["answer"]
    assert data.fact_questions(facts[:1]) == questions[: len(facts[0]["questions"])]


def test_fact_questions_can_be_scored_like_probes(tiny_llama, tokenizer, facts):
    from peft_lab import measure

    questions = data.fact_questions(facts[:3])
    scores = measure.score_probes(tiny_llama, tokenizer, questions)
    assert len(scores) == len(questions)
    assert all(set(s) == {"greedy_right", "logprob"} for s in scores)


def test_the_reviews_are_large_enough_for_intervals_of_about_2_5_points():
    reviews = data.load_task("reviews")
    assert len(reviews.train) + len(reviews.val) + len(reviews.test) >= 2000
    assert len(reviews.test) >= 600 and len(reviews.val) >= 200
    for name in ("train", "val", "test"):
        counts = Counter(label for _, label in getattr(reviews, name))
        assert abs(counts["positive"] - counts["negative"]) <= 2, f"{name}: {counts}"
    texts = [r["text"] for r in _review_rows()]
    assert len(texts) == len(set(texts)), "a review appears twice"


def test_the_fictional_world_has_at_least_300_facts_with_held_out_questions():
    facts = data.load_facts()
    assert len(facts) >= 300
    assert all(len(f["questions"]) >= 2 for f in facts)
    assert all(f["answer"] not in q for f in facts for q in f["questions"]), "a question gives its answer away"


# --- the facts as a task: learn sentences, answer held-out questions ----------------------------------

def test_fact_task_trains_on_sentences_and_tests_on_questions():
    facts = data.load_facts()[:5]
    task = data.fact_task(facts)
    assert task.is_text and not data.load_task("reviews").is_text
    assert [t for t, _ in task.train] == data.fact_training_texts(facts)
    assert task.test == data.fact_questions(facts)
    with pytest.raises(ValueError, match="at least one fact"):
        data.fact_task([])


def test_text_batches_score_every_real_token_and_no_padding(tokenizer):
    task = data.fact_task(data.load_facts()[:3])
    batch = data.encode(task.train, task, tokenizer)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all()


def test_fit_learns_a_text_task_and_accuracy_reads_its_questions(tiny_llama, tokenizer, tmp_path, monkeypatch):
    from peft_lab import freeze, measure, models, train
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))
    task = data.fact_task(data.load_facts()[:4])
    tuned = freeze.apply(models.fresh_copy(tiny_llama), "full", verbose=False)
    run = train.fit(tuned, tokenizer, task, steps=12, lr=1e-2, batch_size=4, progress=False)
    assert sum(run.losses[-3:]) < sum(run.losses[:3])
    assert run.label_losses == []  # no label words in a text task
    result = measure.accuracy(tuned, tokenizer, task, "test")
    assert result["n"] == len(task.test)
    # checked independently: a question counts as answered when greedy decoding writes exactly the answer's tokens
    right = []
    with torch.no_grad():
        for q in task.test:
            prompt = tokenizer(q["prompt"], add_special_tokens=False).input_ids
            answer = tokenizer(q["prompt"] + " " + q["answer"], add_special_tokens=False).input_ids[len(prompt):]
            out = tuned.generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 min_new_tokens=len(answer), pad_token_id=tokenizer.pad_token_id)
            right.append(out[0, len(prompt):].tolist() == answer)
    assert result["predictions"] == right
    assert result["accuracy"] == sum(right) / len(right)
    with pytest.raises(ValueError, match="no 'val' examples"):
        measure.accuracy(tuned, tokenizer, task, "val")


def test_a_fact_task_with_validation_keeps_each_facts_first_question_apart():
    facts = data.load_facts()[:6]
    task = data.fact_task(facts, validation=True)
    assert [q["prompt"] for q in task.val] == [f["questions"][0] for f in facts]
    assert [q["prompt"] for q in task.test] == [q for f in facts for q in f["questions"][1:]]
    assert not {q["prompt"] for q in task.val} & {q["prompt"] for q in task.test}
    assert task.train == data.fact_task(facts).train  # the same sentences to learn
    named = data.first_facts_task(6)
    assert named.name == "fictional_facts_6" and named.val == task.val and named.test == task.test
    with pytest.raises(ValueError, match="between 1 and"):
        data.first_facts_task(0)
