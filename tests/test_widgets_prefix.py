"""Notebook 03's prefix panel, driven from pytest: set the controls, click Run, read the results."""
import pytest
import torch

from peft_lab import plots, prefix, widgets

from conftest import make_tiny_task

pytestmark = pytest.mark.usefixtures("panel_env")  # isolated run log, tiny probes and prose


def test_prefix_panel_runs_every_setting(tiny_model, tokenizer):
    task = make_tiny_task()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    panel = widgets.prefix_panel(tiny_model, tokenizer, task, steps=2, lr=1e-2, compare_with=[])
    assert set(panel.controls) >= {"num_virtual_tokens", "reparametrize", "init", "lr", "steps"}
    assert (panel.controls["num_virtual_tokens"].min, panel.controls["num_virtual_tokens"].max) == (1, 64)

    panel.controls["num_virtual_tokens"].value = 3
    panel.controls["reparametrize"].value = False
    panel.controls["init"].value = "random"
    panel.controls["steps"].value = 3
    panel.run_button.click()
    assert len(panel.runs) == 1
    run = panel.runs[0]
    assert run.tag == "prefix P=3 (random)" and run.method == "prefix" and len(run.losses) == 3
    assert run.config["lr"] == pytest.approx(1e-2)
    assert run.config["num_virtual_tokens"] == 3 and run.config["reparametrize"] is False
    geo = prefix._geometry(tiny_model)
    assert run.trainable_params == 3 * geo["num_layers"] * 2 * geo["num_kv_heads"] * geo["head_dim"]
    assert "accuracy" in run.metrics and "kl" in run.metrics
    assert panel.status.value.startswith("done")

    panel.controls["num_virtual_tokens"].value = 5
    panel.controls["reparametrize"].value = True
    panel.controls["init"].value = "text"
    panel.controls["init_text"].value = "review sentiment : positive or negative"
    panel.controls["steps"].value = 2
    panel.run_button.click()
    assert [r.tag for r in panel.runs] == ["prefix P=3 (random)", "prefix P=5 +MLP (text)"]
    assert panel.runs[1].config["init"] == "text" and panel.runs[1].config["reparametrize"] is True
    assert not panel.run_button.disabled
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items()), "the base model changed"


def test_prefix_trainable_count_matches_formula(tiny_llama, tokenizer):
    task = make_tiny_task()
    panel = widgets.prefix_panel(tiny_llama, tokenizer, task, steps=1, lr=1e-2)
    panel.controls["num_virtual_tokens"].value = 4
    panel.controls["reparametrize"].value = False
    panel.controls["init"].value = "random"
    panel.controls["steps"].value = 1
    run = panel.run()
    # tiny Llama: 2 layers, 2 key/value heads of width 8 (GQA: 4 query heads)
    assert run.trainable_params == 4 * 2 * 2 * (2 * 8)


def test_prefix_attention_plot(tiny_llama, tokenizer):
    import matplotlib
    matplotlib.use("Agg")
    tuned = prefix.apply(tiny_llama, 3)
    ids = tokenizer("the film was great", return_tensors="pt").input_ids
    w = prefix.attention_weights(tuned, ids, layer=1, head=0)
    fig = plots.prefix_attention(w, 3, tokens=tokenizer.convert_ids_to_tokens(ids[0]), share_by_layer=[0.2, 0.3], layers=[0, 1])
    assert len(fig.axes) == 4  # matrix, its colour bar, per-token share, per-layer share
