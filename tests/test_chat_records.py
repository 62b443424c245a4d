"""Schema of data/chat_records.jsonl, the sentence -> JSON record chat task (standard library only)."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
PATH = DATA / "chat_records.jsonl"
GENERATOR = DATA / "make_chat_records.py"
FIELDS = ["person", "vessel", "place", "day", "month", "cargo", "count"]
SIZES = {"train": 360, "val": 80, "test": 240}

# words -> number, written out here rather than imported so the test checks the generator
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60}
_ORD = ("zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
        "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth").split()
_ORD_TENS = {"twentieth": 20, "thirtieth": 30, "fortieth": 40, "fiftieth": 50, "sixtieth": 60}
WORD_NUMBERS = {**{w: i for i, w in enumerate(_ONES)}, **{w: i for i, w in enumerate(_ORD)},
                **_TENS, **_ORD_TENS}
for tens_word, tens in _TENS.items():
    for unit in range(1, 10):
        WORD_NUMBERS[f"{tens_word}-{_ONES[unit]}"] = tens + unit
        WORD_NUMBERS[f"{tens_word}-{_ORD[unit]}"] = tens + unit


def numbers_in(text):
    """Every number written in ``text``: digits (also "9th") and words ("nine", "twenty-first")."""
    found = {int(d) for d in re.findall(r"\d+", text)}
    found |= {WORD_NUMBERS[w] for w in re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower())
              if w in WORD_NUMBERS}
    return found


@pytest.fixture(scope="module")
def rows():
    with open(PATH, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_every_line_has_the_schema(rows):
    for row in rows:
        assert list(row) == ["split", "messages", "fields"]
        assert row["split"] in SIZES
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str)
                   for m in row["messages"])
        fields = row["fields"]
        assert list(fields) == FIELDS
        assert all(isinstance(fields[k], str) and fields[k] for k in FIELDS if k not in ("day", "count"))
        assert isinstance(fields["day"], int) and 1 <= fields["day"] <= 30
        assert isinstance(fields["count"], int) and fields["count"] >= 1


def test_split_sizes(rows):
    assert Counter(r["split"] for r in rows) == SIZES


def test_answer_is_exactly_the_record_on_one_line(rows):
    for row in rows:
        answer = row["messages"][1]["content"]
        assert "\n" not in answer and answer == answer.strip()
        parsed = json.loads(answer)
        assert parsed == row["fields"]
        assert list(parsed) == FIELDS  # keys in the fixed order
        assert answer == json.dumps(row["fields"], ensure_ascii=False, separators=(",", ":"))


def test_lengths(rows):
    for row in rows:
        assert len(row["messages"][0]["content"].split()) < 60
        assert len(row["messages"][1]["content"]) < 300  # well under 60 tokens


def test_every_value_is_written_in_the_user_message(rows):
    for row in rows:
        user = row["messages"][0]["content"]
        numbers = numbers_in(user)
        for key, value in row["fields"].items():
            if isinstance(value, int):
                assert value in numbers, (key, value, user)
            else:
                assert value in user, (key, value, user)


def test_test_split_is_new_but_uses_only_known_field_types(rows):
    by_split = {s: [r for r in rows if r["split"] == s] for s in SIZES}
    train_users = {r["messages"][0]["content"] for r in by_split["train"]}
    train_records = {tuple(r["fields"].values()) for r in by_split["train"]}
    for row in by_split["test"]:
        assert row["messages"][0]["content"] not in train_users
        assert tuple(row["fields"].values()) not in train_records
    users = [r["messages"][0]["content"] for r in rows]
    assert len(set(users)) == len(users), "a user message appears twice"
    train_values = {k: {r["fields"][k] for r in by_split["train"]} for k in FIELDS}
    test_values = {k: {r["fields"][k] for r in by_split["test"]} for k in FIELDS}
    assert test_values["person"] - train_values["person"], "the test split should hold new names"
    assert test_values["month"] <= train_values["month"]
    assert test_values["cargo"] <= train_values["cargo"]


def test_generator_reproduces_the_file(tmp_path):
    out = tmp_path / "chat_records.jsonl"
    subprocess.run([sys.executable, str(GENERATOR), str(out)], check=True, capture_output=True)
    assert out.read_bytes() == PATH.read_bytes()
