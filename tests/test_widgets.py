"""The panel's callback, driven from pytest: set the controls, click Run, read the results."""
import pytest
import torch

from peft_lab import widgets

from conftest import make_tiny_task

pytestmark = pytest.mark.usefixtures("panel_env")  # isolated run log, tiny probes and prose


def test_clicking_run_trains_measures_and_records(tiny_llama, tokenizer):
    task = make_tiny_task()
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    panel = widgets.freezing_panel(tiny_llama, tokenizer, task, steps=2)
    panel.controls["choice"].value = "attention"
    panel.controls["steps"].value = 3
    panel.controls["lr"].value = 1e-3
    panel.run_button.click()
    assert len(panel.runs) == 1
    run = panel.runs[0]
    assert run.tag == "freeze attention" and run.method == "freeze:attention" and len(run.losses) == 3 and run.config["lr"] == pytest.approx(1e-3)
    assert "accuracy" in run.metrics and "kl" in run.metrics
    assert panel.status.value.startswith("done")
    panel.controls["choice"].value = "last_n"
    panel.controls["n"].value = 1
    panel.run_button.click()
    assert [r.tag for r in panel.runs] == ["freeze attention", "freeze last 1"]
    assert [r.method for r in panel.runs] == ["freeze:attention", "freeze:last_n"]  # freeze.apply's own words
    assert not panel.run_button.disabled
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items()), "the base model changed"


def test_a_full_run_from_the_panel_is_not_the_full_baseline(tiny_llama, tokenizer):
    from peft_lab import runlog

    panel = widgets.freezing_panel(tiny_llama, tokenizer, make_tiny_task(), steps=2)
    panel.controls["choice"].value = "full"
    panel.run_button.click()
    assert panel.runs[0].tag == "freeze full" and panel.runs[0].method == "full" and panel.runs[0].label == "freeze full, lr 2e-5"
    assert runlog.latest_run("full", "tiny") is None  # notebooks 02-04 look the baseline up as "full"


def test_the_panel_refuses_settings_that_do_not_fit_in_memory(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setattr(widgets, "free_memory", lambda device: 1000)  # 1,000 bytes free
    panel = widgets.freezing_panel(tiny_llama, tokenizer, make_tiny_task(), steps=2)
    panel.controls["choice"].value = "full"
    panel.run_button.click()  # ipywidgets logs the exception; the panel shows it
    assert "MiB" in panel.status.value and "free" in panel.status.value and panel.runs == []


def test_panel_controls_are_named_after_the_apply_arguments(tiny_llama, tokenizer):
    import inspect

    from peft_lab import methods
    from peft_lab.methods import freeze

    for method in widgets.PANELS:
        module = freeze if method == "freeze" else methods.get(method)
        panel = widgets.method_panel(method, tiny_llama, tokenizer, make_tiny_task())
        knobs = set(panel.controls) - {"lr", "steps"}
        assert knobs <= set(inspect.signature(module.apply).parameters), (method, knobs)
    with pytest.raises(ValueError, match="panels exist for freeze, lora"):
        widgets.method_panel("ia4", tiny_llama, tokenizer, make_tiny_task())


def test_running_a_panel_twice_gives_the_same_run(tiny_llama, tokenizer):
    panel = widgets.lora_panel(tiny_llama, tokenizer, make_tiny_task(), steps=2)
    first, second = panel.run(), panel.run()  # no double wrapping, no stale state: the same seeded run
    assert first.losses == second.losses and first.metrics["accuracy"] == second.metrics["accuracy"]



def test_the_learning_rate_trained_is_the_one_the_slider_shows(tiny_llama, tokenizer):
    # in the browser a log slider snaps 2e-4 to 10**-3.75 = 1.78e-4 and shows "2e-04": the run must use 2e-4
    panel = widgets.freezing_panel(tiny_llama, tokenizer, make_tiny_task(), steps=1)
    panel.controls["lr"].value = 10 ** -3.75
    panel.run_button.click()
    assert panel.runs[0].config["lr"] == 2e-4


def test_the_widgets_under_test_are_the_expected_version():
    # make test runs these tests twice: under the pinned ipywidgets 8 (requirements.txt) and under Colab's 7.7.1
    # (PEFT_LAB_EXPECT_IPYWIDGETS, set by the Makefile's widget-test-colab), so each run says what it tested
    import os
    import re
    from pathlib import Path

    import ipywidgets

    pinned = re.search(r"^ipywidgets==(\S+)", (Path(__file__).parent.parent / "requirements.txt").read_text(), re.M)
    expected = os.environ.get("PEFT_LAB_EXPECT_IPYWIDGETS") or pinned.group(1)
    assert ipywidgets.__version__ == expected, f"the widget tests ran under ipywidgets {ipywidgets.__version__}, not {expected}"
