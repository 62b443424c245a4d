"""The panel's callback, driven from pytest: set the controls, click Run, read the results."""
import pytest
import torch

from peft_lab import data, widgets

PAIRS = [("the film was great", "positive"), ("the film was bad", "negative"),
         ("i loved this movie", "positive"), ("i hated this movie", "negative")]


@pytest.fixture(autouse=True)
def run_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_LAB_RUNLOG", str(tmp_path / "runs.jsonl"))
    monkeypatch.setenv("PEFT_LAB_QUICK", "1")
    monkeypatch.setattr(data, "load_probes", lambda: [{"prompt": "the capital of france is", "answer": "paris", "topic": "t"}] * 5)
    monkeypatch.setattr(data, "load_prose", lambda source=None: "the film was great and the food was bad . " * 10)


def test_clicking_run_trains_measures_and_records(tiny_llama, tokenizer):
    task = data.Task("tiny", PAIRS * 2, PAIRS, PAIRS, data.VERBALIZER_SENTIMENT, data.REVIEW_TEMPLATE)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    panel = widgets.freezing_panel(tiny_llama, tokenizer, task, steps=2)
    panel.controls["choice"].value = "attention"
    panel.controls["steps"].value = 3
    panel.controls["lr"].value = 1e-3
    panel.run_button.click()
    assert len(panel.runs) == 1
    run = panel.runs[0]
    assert run.method == "attention" and len(run.losses) == 3 and run.config["lr"] == pytest.approx(1e-3)
    assert "accuracy" in run.metrics and "kl" in run.metrics
    assert panel.status.value.startswith("done")
    panel.controls["choice"].value = "last_n"
    panel.controls["n"].value = 1
    panel.run_button.click()
    assert [r.method for r in panel.runs] == ["attention", "last 1"]
    assert not panel.run_button.disabled
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items()), "the base model changed"
