"""Notebook 02's LoRA panel, driven from pytest: set the controls, click Run, read the results."""
import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from peft_lab import lora, plots, widgets

from conftest import make_tiny_task

pytestmark = pytest.mark.usefixtures("panel_env")  # isolated run log, tiny probes and prose


def test_lora_panel_trains_with_the_chosen_settings(tiny_llama, tokenizer):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    panel = widgets.lora_panel(tiny_llama, tokenizer, make_tiny_task(), steps=2, lr=1e-3)
    assert panel.controls["targets"].value == ("q_proj", "v_proj")
    assert set(panel.controls["targets"].options) == set(widgets.LORA_TARGETS)
    panel.controls["rank"].value = 4
    panel.controls["alpha"].value = 8
    panel.controls["steps"].value = 3
    panel.controls["lr"].value = 1e-2
    panel.run_button.click()
    assert len(panel.runs) == 1
    run = panel.runs[0]
    assert run.tag == "LoRA r=4 (q,v)" and run.method == "lora" and len(run.losses) == 3
    assert run.config["rank"] == 4 and run.config["alpha"] == 8 and run.config["lr"] == pytest.approx(1e-2)
    # 2 blocks x (q: 4 x (32 + 32) + v: 4 x (32 + 16)), the tiny Llama's k/v width is 16 (GQA)
    assert run.trainable_params == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert "accuracy" in run.metrics and "kl" in run.metrics
    assert panel.status.value.startswith("done")

    panel.controls["targets"].value = ("gate_proj", "up_proj", "down_proj")
    panel.controls["dropout"].value = 0.1
    panel.controls["steps"].value = 2
    panel.run_button.click()
    assert [r.tag for r in panel.runs] == ["LoRA r=4 (q,v)", "LoRA r=4 (gate,up,down)"]
    assert panel.runs[1].config["dropout"] == pytest.approx(0.1)
    assert not panel.run_button.disabled
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items()), "the base model changed"
    assert not lora.lora_layers(tiny_llama), "the panel must train copies, never the base"


def test_lora_panel_reports_an_empty_target_choice(tiny_llama, tokenizer):
    panel = widgets.lora_panel(tiny_llama, tokenizer, make_tiny_task(), steps=1)
    panel.controls["targets"].value = ()
    panel.run_button.click()  # the panel shows the error instead of training (ipywidgets logs the traceback)
    assert "Select at least one target" in panel.status.value
    assert panel.runs == [] and not panel.run_button.disabled


def test_lora_panel_offers_gpt2_layer_names(tiny_gpt2, tokenizer):
    panel = widgets.lora_panel(tiny_gpt2, tokenizer, make_tiny_task())
    assert "c_attn" in panel.controls["targets"].options and panel.controls["targets"].value


def test_singular_values_plot_shows_the_rank(tiny_llama):
    layer = lora.LoRALinear(torch.nn.Linear(32, 24, bias=False), rank=3)
    torch.nn.init.normal_(layer.lora_B.weight)
    ax = plots.singular_values({"B A": layer.delta_weight()})
    y = ax.lines[0].get_ydata()
    assert len(y) == 24 and y[2] > 1e-3 and y[3] < 1e-5  # three real values, then the cliff
