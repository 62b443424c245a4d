"""Notebook 04's prompt panel, driven from pytest: set the controls, click Run, read the results."""
import pytest
import torch

from peft_lab import widgets

from conftest import make_tiny_task

pytestmark = pytest.mark.usefixtures("panel_env")  # isolated run log, tiny probes and prose


def test_prompt_panel_trains_prompts_in_front_of_the_untouched_base(tiny_llama, tokenizer):
    task = make_tiny_task()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    panel = widgets.prompt_panel(tiny_llama, tokenizer, task, steps=2, lr=1e-1, compare_with=[],
                                 init_text="is this review positive or negative")
    assert set(panel.controls) == {"num_virtual_tokens", "init", "init_text", "lr", "steps"}
    panel.controls["num_virtual_tokens"].value = 4
    panel.controls["init"].value = "text"
    panel.controls["steps"].value = 3
    panel.run_button.click()
    assert len(panel.runs) == 1
    run = panel.runs[0]
    assert run.tag == "prompt P=4 (text)" and run.method == "prompt" and len(run.losses) == 3
    assert run.trainable_params == 4 * tiny_llama.config.hidden_size
    assert run.config["num_virtual_tokens"] == 4 and run.config["init"] == "text"
    assert run.config["lr"] == pytest.approx(1e-1)
    assert "accuracy" in run.metrics and "kl" in run.metrics and run.metrics["kl"] >= 0
    assert panel.status.value.startswith("done")

    panel.controls["num_virtual_tokens"].value = 2
    panel.controls["init"].value = "random"
    panel.controls["lr"].value = 1e-2
    panel.run_button.click()
    assert [r.tag for r in panel.runs] == ["prompt P=4 (text)", "prompt P=2 (random)"]
    assert panel.runs[1].trainable_params == 2 * tiny_llama.config.hidden_size
    assert not panel.run_button.disabled
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items()), "the base model changed"


def test_prompt_panel_keeps_earlier_runs_and_shows_errors(tiny_llama, tokenizer):
    task = make_tiny_task()
    earlier = ["an earlier run"]
    panel = widgets.prompt_panel(tiny_llama, tokenizer, task, steps=2, compare_with=earlier)
    assert panel.runs == earlier and panel.runs is not earlier
    panel.controls["init_text"].value = ""  # text init without a text: the panel shows a clear error
    panel.run_button.click()               # (ipywidgets logs the exception instead of raising it)
    assert "init_text" in panel.status.value and panel.runs == earlier
    assert not panel.run_button.disabled
